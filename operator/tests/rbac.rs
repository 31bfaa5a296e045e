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

#[test]
fn rbac_covers_every_call_and_no_more() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rbac.yaml"))
        .expect("rbac.yaml");
    let mut docs = serde_yaml::Deserializer::from_str(&text);
    let cluster_role =
        ClusterRole::deserialize(docs.next().expect("first document")).expect("ClusterRole");
    let role = Role::deserialize(docs.next().expect("second document")).expect("Role");
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
    // Users own SmtpRelays and SendingDomains; the operator only writes their status.
    for resource in ["smtprelays", "sendingdomains"] {
        for verb in ["create", "patch", "update", "delete"] {
            assert!(
                !allows(&rules, "petrel.dev", resource, verb),
                "{verb} {resource}"
            );
        }
    }
    let lease_rules = role.rules.expect("lease rules");
    assert!(allows(
        &lease_rules,
        "coordination.k8s.io",
        "leases",
        "update"
    ));
}
