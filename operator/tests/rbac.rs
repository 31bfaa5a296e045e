//! operator/rbac.yaml parses as RBAC objects and grants what the reconcilers use.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde::Deserialize;

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

/// The rules of the document named `name` in operator/rbac.yaml.
fn rules_of(name: &str) -> Vec<PolicyRule> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rbac.yaml"))
        .expect("rbac.yaml");
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).expect("YAML");
        let named = value["metadata"]["name"].as_str() == Some(name);
        match value["kind"].as_str() {
            Some("ClusterRole") if named => {
                let role: ClusterRole = serde_yaml::from_value(value).expect("ClusterRole");
                return role.rules.expect("rules");
            }
            Some("Role") if named => {
                let role: Role = serde_yaml::from_value(value).expect("Role");
                return role.rules.expect("rules");
            }
            _ => {}
        }
    }
    panic!("no role {name} in rbac.yaml")
}

#[test]
fn optional_roles_grant_exactly_their_child_kind() {
    for (name, group, resource) in [
        ("petrel-operator-keda", "keda.sh", "scaledobjects"),
        (
            "petrel-operator-external-dns",
            "externaldns.k8s.io",
            "dnsendpoints",
        ),
    ] {
        let rules = rules_of(name);
        // Owned children: watched, applied, pruned when switched off.
        for verb in ["get", "list", "watch", "create", "patch", "delete"] {
            assert!(allows(&rules, group, resource, verb), "{name}: {verb}");
        }
        assert_eq!(rules.len(), 1, "{name}: one rule only");
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&[resource.to_string()][..])
        );
        // Not in the base role: granted only when the feature is on.
        assert!(!allows(
            &rules_of("petrel-operator"),
            group,
            resource,
            "get"
        ));
    }
}

#[test]
fn rbac_covers_every_call_and_no_more() {
    let cluster_role = ClusterRole {
        rules: Some(rules_of("petrel-operator")),
        ..Default::default()
    };
    let role = Role {
        rules: Some(rules_of("petrel-operator-leader-election")),
        ..Default::default()
    };
    let rules = cluster_role.rules.expect("rules");
    for (group, resource, verbs) in [
        ("petrel.dev", "smtprelays", &["get", "list", "watch"][..]),
        ("petrel.dev", "smtprelays/status", &["patch"][..]),
        ("petrel.dev", "dkimkeys", &["create", "patch"][..]),
        ("petrel.dev", "sendingdomains/status", &["patch"][..]),
        (
            "",
            "secrets",
            &["get", "list", "watch", "patch", "delete"][..],
        ),
        ("", "configmaps", &["patch"][..]),
        // The feedback Service goes when spec.feedback does.
        ("", "services", &["patch", "delete"][..]),
        // The petrel.dev/resume annotation is removed once the relay resumed.
        ("petrel.dev", "sendingdomains", &["patch"][..]),
        ("apps", "deployments", &["patch", "watch"][..]),
        ("policy", "poddisruptionbudgets", &["patch"][..]),
        (
            "autoscaling",
            "horizontalpodautoscalers",
            &["patch", "delete"][..],
        ),
        ("events.k8s.io", "events", &["create"][..]),
    ] {
        for verb in verbs {
            assert!(
                allows(&rules, group, resource, verb),
                "{verb} {group}/{resource}"
            );
        }
    }
    // Least privilege: no wildcards, nothing cluster-scoped beyond reads of our kinds.
    assert!(rules.iter().all(|r| r.verbs.iter().all(|v| v != "*")));
    assert!(!allows(&rules, "", "pods", "get"));
    assert!(!allows(&rules, "", "configmaps", "delete"));
    // Users own SmtpRelays and SendingDomains; the operator writes their
    // status, and patches a SendingDomain only to drop its resume annotation.
    for resource in ["smtprelays", "sendingdomains"] {
        for verb in ["create", "update", "delete"] {
            assert!(
                !allows(&rules, "petrel.dev", resource, verb),
                "{verb} {resource}"
            );
        }
    }
    assert!(!allows(&rules, "petrel.dev", "smtprelays", "patch"));
    let lease_rules = role.rules.expect("lease rules");
    assert!(allows(
        &lease_rules,
        "coordination.k8s.io",
        "leases",
        "update"
    ));
}
