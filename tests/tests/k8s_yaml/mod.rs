//! Shared by the chart and examples tests: splitting multi-document YAML and
//! parsing each document strictly into its Kubernetes type.
//!
//! k8s-openapi and the CRD types ignore unknown fields, so a misspelt key
//! (`readOnlyRootFileSystem`) would parse and then be silently dropped by the
//! API server. [`parse_strict`] therefore round-trips the document through
//! the type and fails when any key of the input did not survive.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every non-empty document of a multi-document YAML stream, as JSON values.
pub fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{origin}: document {i} is not YAML: {e}"));
            if value.is_null() {
                return None;
            }
            Some(
                serde_json::to_value(value)
                    .unwrap_or_else(|e| panic!("{origin}: document {i}: {e}")),
            )
        })
        .collect()
}

use serde::Deserialize;

/// `apiVersion/kind metadata.namespace/metadata.name`, for messages.
pub fn describe(doc: &Value) -> String {
    format!(
        "{}/{} {}/{}",
        doc["apiVersion"].as_str().unwrap_or("?"),
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or("-"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Parses `doc` as `T` and checks that every key of `doc` is kept by `T`.
pub fn parse_strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| format!("{}: {e}", describe(doc)))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{}: {e}", describe(doc)))?;
    let mut lost = Vec::new();
    lost_keys(doc, &back, String::new(), &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "{}: unknown or misplaced fields: {}",
            describe(doc),
            lost.join(", ")
        ))
    }
}

/// Paths of `original` that `round_trip` does not have. A null or empty
/// value in the original may be dropped (it means "unset").
fn lost_keys(original: &Value, round_trip: &Value, path: String, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => lost_keys(value, other, here, lost),
                    None if is_empty(value) => {}
                    None => lost.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, value) in a.iter().enumerate() {
                match b.get(i) {
                    Some(other) => lost_keys(value, other, format!("{path}[{i}]"), lost),
                    None => lost.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

/// Every `.rs` file under `dir`, recursively.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Every `petrel_*` identifier in `text` (metric names in PromQL or Rust
/// string literals).
pub fn petrel_identifiers(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("petrel_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            found.push(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    found
}

/// Metric names defined in the relay and operator sources: every string
/// literal that starts with `petrel_`.
pub fn defined_metric_names() -> Vec<String> {
    let root = workspace();
    let mut names = Vec::new();
    for dir in ["relay/src", "operator/src"] {
        for file in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for (i, _) in text.match_indices("\"petrel_") {
                let rest = &text[i + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                names.push(rest[..end].to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The metric a series name belongs to: histograms expose `_bucket`, `_sum`
/// and `_count` series under their own name.
pub fn base_metric<'a>(series: &'a str, defined: &[String]) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && defined.iter().any(|d| d == base)
        {
            return base;
        }
    }
    series
}

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

/// Checks `value` against a CRD's structural OpenAPI schema the way the API
/// server does before CEL: types, required fields, unknown fields, enums,
/// bounds, lengths and patterns. Returns every violation with its path.
pub fn validate_schema(value: &Value, schema: &JSONSchemaProps, path: &str) -> Vec<String> {
    let mut errors = Vec::new();
    check_node(value, schema, path, &mut errors);
    errors
}

fn check_node(value: &Value, schema: &JSONSchemaProps, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.nullable != Some(true) {
            errors.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    if schema.x_kubernetes_preserve_unknown_fields == Some(true) && schema.properties.is_none() {
        return;
    }
    let type_ok = match schema.type_.as_deref() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!(
            "{path}: expected {}, got {value}",
            schema.type_.as_deref().unwrap_or("?")
        ));
        return;
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        errors.push(format!("{path}: {value} is not one of the allowed values"));
    }
    if let Some(n) = value.as_f64()
        && (schema.minimum.is_some_and(|m| n < m) || schema.maximum.is_some_and(|m| n > m))
    {
        errors.push(format!("{path}: {n} is out of range"));
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as i64;
        if schema.min_length.is_some_and(|m| len < m) || schema.max_length.is_some_and(|m| len > m)
        {
            errors.push(format!("{path}: length {len} is out of range"));
        }
        if let Some(pattern) = &schema.pattern {
            match regex::Regex::new(pattern) {
                Ok(re) if !re.is_match(s) => {
                    errors.push(format!("{path}: {s:?} does not match {pattern}"))
                }
                Ok(_) => {}
                Err(e) => errors.push(format!(
                    "{path}: schema pattern {pattern} does not compile: {e}"
                )),
            }
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as i64;
        if schema.min_items.is_some_and(|m| len < m) || schema.max_items.is_some_and(|m| len > m) {
            errors.push(format!("{path}: {len} items is out of range"));
        }
        if let Some(JSONSchemaPropsOrArray::Schema(item_schema)) = &schema.items {
            for (i, item) in items.iter().enumerate() {
                check_node(item, item_schema, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        for required in schema.required.iter().flatten() {
            if !map.contains_key(required) {
                errors.push(format!("{path}.{required}: required"));
            }
        }
        for (key, item) in map {
            let here = format!("{path}.{key}");
            match (
                schema.properties.as_ref().and_then(|p| p.get(key)),
                &schema.additional_properties,
            ) {
                (Some(prop), _) => check_node(item, prop, &here, errors),
                (None, Some(JSONSchemaPropsOrBool::Schema(extra))) => {
                    check_node(item, extra, &here, errors)
                }
                (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
                (None, _) if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
                (None, _) => errors.push(format!("{here}: unknown field")),
            }
        }
    }
}

/// The `spec` schema of the CRD for `kind`, from crdgen.
pub fn spec_schema(kind: &str) -> JSONSchemaProps {
    petrel_crds::crdgen::crds()
        .into_iter()
        .map(|(_, crd)| crd)
        .find(|crd| crd.spec.names.kind == kind)
        .and_then(|crd| crd.spec.versions.into_iter().next())
        .and_then(|v| v.schema)
        .and_then(|s| s.open_api_v3_schema)
        .and_then(|s| s.properties)
        .and_then(|mut p| p.remove("spec"))
        .unwrap_or_else(|| panic!("no CRD spec schema for {kind}"))
}
