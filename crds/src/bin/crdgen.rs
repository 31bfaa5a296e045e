//! Writes the CustomResourceDefinitions of the petrel.dev API to
//! `charts/petrel/crds/` (the Helm chart installs them from there).
//!
//! `cargo run -p petrel-crds --bin crdgen` regenerates the files;
//! `cargo run -p petrel-crds --bin crdgen -- --print` prints them instead.
//! The `crd_drift` test fails when the committed files differ.

use std::process::ExitCode;

fn main() -> ExitCode {
    let print = std::env::args().skip(1).any(|a| a == "--print");
    let rendered = match petrel_crds::crdgen::render_all() {
        Ok(rendered) => rendered,
        Err(err) => {
            eprintln!("crdgen: {err}");
            return ExitCode::FAILURE;
        }
    };
    if print {
        for (_, yaml) in &rendered {
            print!("---\n{yaml}");
        }
        return ExitCode::SUCCESS;
    }
    let dir = petrel_crds::crdgen::crd_dir();
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: creating {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, yaml) in &rendered {
        let path = dir.join(file);
        if let Err(err) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: writing {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
