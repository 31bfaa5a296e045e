//! The committed CRDs in `charts/petrel/crds/` must be exactly what `crdgen`
//! prints, and each must parse back as a valid apiextensions.k8s.io/v1 CRD.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use petrel_crds::crdgen::{REGENERATE_COMMAND, crd_dir, render_all};

#[test]
fn committed_crds_match_generated() {
    let mut stale = Vec::new();
    for (file, expected) in render_all().expect("CRDs render") {
        let path = crd_dir().join(file);
        match std::fs::read_to_string(&path) {
            Ok(committed) if committed == expected => {}
            Ok(_) => stale.push(format!("{} differs", path.display())),
            Err(err) => stale.push(format!("{} unreadable: {err}", path.display())),
        }
    }
    assert!(
        stale.is_empty(),
        "CRDs are out of date ({}); run `{REGENERATE_COMMAND}` and commit the result",
        stale.join(", ")
    );
}

/// Every object schema must be structural: each node has a type (or is
/// int-or-string / preserve-unknown-fields), and nothing uses $ref.
fn assert_structural(path: &str, schema: &JSONSchemaProps) {
    assert!(schema.ref_path.is_none(), "{path}: $ref is not allowed");
    let escape = schema.x_kubernetes_int_or_string == Some(true)
        || schema.x_kubernetes_preserve_unknown_fields == Some(true);
    assert!(schema.type_.is_some() || escape, "{path}: missing type");
    for (name, prop) in schema.properties.iter().flatten() {
        assert_structural(&format!("{path}.{name}"), prop);
    }
    if let Some(items) = &schema.items {
        let k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items) = items else {
            panic!("{path}: items must be a single schema");
        };
        assert_structural(&format!("{path}[]"), items);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(extra)) =
        &schema.additional_properties
    {
        assert_structural(&format!("{path}{{}}"), extra);
    }
}

/// Every spec field carries a description, which `kubectl explain` shows.
fn assert_documented(path: &str, schema: &JSONSchemaProps) {
    for (name, prop) in schema.properties.iter().flatten() {
        let here = format!("{path}.{name}");
        assert!(
            prop.description.as_deref().is_some_and(|d| !d.is_empty()),
            "{here}: no description"
        );
        // k8s-openapi types (resources, affinity, ...) bring their own docs.
        if !matches!(name.as_str(), "resources" | "affinity" | "tolerations") {
            assert_documented(&here, prop);
        }
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        assert_documented(&format!("{path}[]"), items);
    }
}

#[test]
fn committed_crds_parse_as_structural_v1_crds() {
    for (file, _) in render_all().expect("CRDs render") {
        let path = crd_dir().join(file);
        let text = std::fs::read_to_string(&path).expect("committed CRD readable");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap_or_else(|err| {
            panic!("{}: not a CustomResourceDefinition: {err}", path.display())
        });
        assert_eq!(crd.spec.group, "petrel.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["petrel".to_string()][..])
        );
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            "{file}: status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default();
        assert!(
            columns.iter().any(|c| c.name == "AGE"),
            "{file}: AGE column"
        );
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema present");
        assert_structural(file, schema);
        let spec = &schema.properties.as_ref().expect("properties")["spec"];
        assert_documented(&format!("{file}:spec"), spec);
        let status = &schema.properties.as_ref().expect("properties")["status"];
        assert_documented(&format!("{file}:status"), status);
    }
}
