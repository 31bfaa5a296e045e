//! Desired objects of an SmtpRelay, built by pure functions: the rendered
//! RelayConfig (ConfigMap), the aggregated DKIM key Secret, the Deployment,
//! Service, PodDisruptionBudget and HorizontalPodAutoscaler.
//!
//! Config and keys reach running pods through their mounted volumes (the relay
//! re-reads them); only what needs a new process (image, resources, the startup
//! part of the rendered config, listener AUTH policy) goes into the pod template's
//! restart-hash annotation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, HTTPGetAction, KeyToPath, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile,
    Secret, SecretProjection, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeProjection, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use petrel_crds::config as rc;
use petrel_crds::sending_domain::SendingDomainSpec;
use petrel_crds::smtp_relay::{self as sr, SmtpRelay};
use petrel_crds::status::DkimKeyEntry;

use crate::error::InvalidSpec;

/// `spec.events` as the relay's `events`: each webhook's secret is the file
/// named after it in [`WEBHOOKS_DIR`] (see [`webhook_volume`]).
fn events_config(events: Option<&sr::EventsSpec>) -> Result<rc::EventsConfig, InvalidSpec> {
    let mut config = rc::EventsConfig::default();
    let Some(events) = events else {
        return Ok(config);
    };
    if let Some(retention) = &events.retention {
        config.retention = duration("spec.events.retention", retention)?;
    }
    config.webhooks = events
        .webhooks
        .iter()
        .map(|w| {
            let mut hook = rc::Webhook::new(&w.name, &w.url, format!("{WEBHOOKS_DIR}/{}", w.name));
            hook.types = w.types.clone();
            hook
        })
        .collect();
    Ok(config)
}

/// One projected volume holding every webhook's secret key as the file
/// `<webhook name>` (one volume, not one per webhook: volume names are
/// short and the list may grow).
fn webhook_volume(events: Option<&sr::EventsSpec>) -> Option<Volume> {
    let hooks = &events?.webhooks;
    if hooks.is_empty() {
        return None;
    }
    let sources = hooks
        .iter()
        .map(|w| VolumeProjection {
            secret: Some(SecretProjection {
                name: w.secret_ref.name.clone(),
                items: Some(vec![KeyToPath {
                    key: w.secret_ref.key.clone(),
                    path: w.name.clone(),
                    mode: None,
                }]),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .collect();
    Some(Volume {
        name: "webhooks".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: Some(0o440),
        }),
        ..Default::default()
    })
}

pub use crate::names::HTTP_PORT;
/// Key of the rendered config in the ConfigMap.
pub const CONFIG_KEY: &str = "relay.yaml";
/// Pod-template annotation over what needs a restart.
pub const RESTART_HASH_ANNOTATION: &str = "petrel.dev/restart-hash";
/// Uid and gid the relay runs as (distroless "nonroot").
pub const RUN_AS: i64 = 65532;

pub const CONFIG_DIR: &str = "/etc/petrel/config";
const DKIM_DIR: &str = "/etc/petrel/dkim";
const TLS_DIR: &str = "/etc/petrel/tls";
const AUTH_DIR: &str = "/etc/petrel/auth";
const TRACKING_DIR: &str = "/etc/petrel/tracking";
const REDIS_DIR: &str = "/etc/petrel/redis";
const SMARTHOST_DIR: &str = "/etc/petrel/smarthost";
/// Webhook signing secrets, one file per webhook name.
pub const WEBHOOKS_DIR: &str = "/etc/petrel/webhooks";

pub use crate::context::BuildSettings;
pub use crate::names::{
    base_name, config_map_name, dkim_secret_name, feedback_secret_name, key_file_name,
};

use super::feedback;

/// A SendingDomain bound to the relay, with the key it signs with now.
#[derive(Clone, Debug)]
pub struct BoundDomain {
    /// The SendingDomain's spec.
    pub spec: SendingDomainSpec,
    /// The active DKIM key (its private key is in `keys`).
    pub active_key: DkimKeyEntry,
}

/// Labels on every child object and selecting the relay pods.
pub fn selector_labels(relay: &SmtpRelay) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "petrel-relay".into()),
        ("app.kubernetes.io/instance".into(), relay.name_any()),
    ])
}

pub(crate) fn labels(relay: &SmtpRelay) -> BTreeMap<String, String> {
    let mut labels = selector_labels(relay);
    labels.insert(
        crate::names::MANAGED_BY.into(),
        crate::names::FIELD_MANAGER.into(),
    );
    labels.insert("app.kubernetes.io/component".into(), "smtp-relay".into());
    labels
}

/// Metadata of a child object: labels and the relay as controlling owner.
pub(crate) fn child_meta(relay: &SmtpRelay, name: String) -> ObjectMeta {
    meta(relay, name)
}

fn meta(relay: &SmtpRelay, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: relay.namespace(),
        labels: Some(labels(relay)),
        owner_references: relay.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// In-cluster `host:port` of each listener.
pub fn endpoints(relay: &SmtpRelay) -> Vec<String> {
    let ns = relay.namespace().unwrap_or_else(|| "default".into());
    relay
        .spec
        .listeners
        .iter()
        .map(|l| format!("{}.{ns}.svc:{}", base_name(relay), l.port))
        .collect()
}

fn duration(field: &str, value: &str) -> Result<rc::Duration, InvalidSpec> {
    rc::Duration::from_str(value)
        .map_err(|e| InvalidSpec::new("InvalidDuration", format!("{field}: {e}")))
}

/// `spec.redis.partitions`, 16 when unset; the relay refuses anything
/// outside 1..=1024, so the spec is refused here with the field named.
fn partitions(value: Option<i32>) -> Result<u32, InvalidSpec> {
    let Some(value) = value else { return Ok(16) };
    u32::try_from(value)
        .ok()
        .filter(|n| (1..=rc::MAX_PARTITIONS).contains(n))
        .ok_or_else(|| {
            InvalidSpec::new(
                "InvalidValue",
                format!(
                    "spec.redis.partitions: {value} is out of range (1 to {})",
                    rc::MAX_PARTITIONS
                ),
            )
        })
}

fn non_negative(field: &str, value: i64) -> Result<u32, InvalidSpec> {
    u32::try_from(value)
        .map_err(|_| InvalidSpec::new("InvalidValue", format!("{field}: {value} is out of range")))
}

/// Renders the relay's config file from the SmtpRelay and its bound domains.
/// `smarthost_username` comes from the credentials Secret.
pub fn relay_config(
    relay: &SmtpRelay,
    domains: &[BoundDomain],
    smarthost_username: Option<String>,
) -> Result<rc::RelayConfig, InvalidSpec> {
    let spec = &relay.spec;
    let ns = relay.namespace().unwrap_or_else(|| "default".into());
    let listeners: Vec<rc::Listener> = spec
        .listeners
        .iter()
        .map(|l| rc::Listener {
            name: l.name.clone(),
            address: std::net::SocketAddr::from((
                [0, 0, 0, 0],
                u16::try_from(l.effective_target_port()).unwrap_or(0),
            )),
            tls: l.tls.into(),
            auth: l.auth.into(),
            allow_insecure_auth: l.allow_insecure_auth,
            role: rc::ListenerRole::Submission,
        })
        .chain(feedback::listener(relay))
        .collect();
    let trusted_networks = spec
        .trusted_networks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.parse().map_err(|e| {
                InvalidSpec::new(
                    "InvalidTrustedNetwork",
                    format!("spec.trustedNetworks[{i}]: {n:?} is not a CIDR ({e})"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let delivery_spec = &spec.delivery;
    let smarthost = match (&delivery_spec.transport, &delivery_spec.smarthost) {
        (sr::Transport::Smarthost, Some(s)) => Some(rc::Smarthost {
            host: s.host.clone(),
            port: u16::try_from(s.port).unwrap_or(587),
            tls: s.tls.into(),
            username: smarthost_username,
            password_file: s
                .credentials_secret_ref
                .as_ref()
                .map(|_| PathBuf::from(format!("{SMARTHOST_DIR}/password"))),
        }),
        (sr::Transport::Smarthost, None) => {
            return Err(InvalidSpec::new(
                "MissingSmarthost",
                "spec.delivery.transport is smarthost but spec.delivery.smarthost is not set",
            ));
        }
        (sr::Transport::Mx, _) => None,
    };
    let retry_schedule = delivery_spec
        .retry_schedule
        .iter()
        .enumerate()
        .map(|(i, d)| duration(&format!("spec.delivery.retrySchedule[{i}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    let delivery = rc::DeliveryConfig {
        transport: delivery_spec.transport.into(),
        smarthost,
        retry_schedule,
        max_queue_lifetime: duration(
            "spec.delivery.maxQueueLifetime",
            &delivery_spec.max_queue_lifetime,
        )?,
        outbound_tls: delivery_spec.outbound_tls.into(),
        tls: rc::OutboundTlsConfig {
            ca_file: None,
            policies: delivery_spec
                .tls_policies
                .iter()
                .map(|p| rc::TlsPolicyOverride {
                    domain: p.domain.clone(),
                    mode: p.mode.into(),
                })
                .collect(),
        },
        mta_sts: delivery_spec.mta_sts,
        dane: delivery_spec.dane,
        tls_rpt: delivery_spec.tls_rpt,
        tls_report: delivery_spec
            .tls_report
            .as_ref()
            .map(|r| rc::TlsReportConfig {
                organization_name: r.organization_name.clone(),
                contact_info: r.contact_info.clone(),
            })
            .unwrap_or_default(),
        per_destination_concurrency: non_negative(
            "spec.delivery.perDestinationConcurrency",
            delivery_spec.per_destination_concurrency.into(),
        )?,
        ..Default::default()
    };
    let limits = rc::Limits {
        max_message_size: u64::try_from(spec.limits.max_message_size).unwrap_or(0),
        max_recipients: non_negative(
            "spec.limits.maxRecipients",
            spec.limits.max_recipients.into(),
        )?,
        max_connections: non_negative(
            "spec.limits.maxConnections",
            spec.limits.max_connections.into(),
        )?,
        max_connections_per_client: non_negative(
            "spec.limits.maxConnectionsPerClient",
            spec.limits.max_connections_per_client.into(),
        )?,
        ..Default::default()
    };
    let mut sending = Vec::new();
    for d in domains {
        let key = &d.active_key;
        let limits = d.spec.rate_limits.clone().unwrap_or_default();
        let to_u32 = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
        let (unsubscribe, feedback_id, reputation) =
            feedback::domain_settings(&d.spec).map_err(|e| {
                InvalidSpec::new(
                    e.reason,
                    format!("SendingDomain for {}: {}", d.spec.domain, e.message),
                )
            })?;
        sending.push(rc::SendingDomain {
            domain: d.spec.domain.clone(),
            dkim: rc::DkimConfig {
                selector: key.selector.clone(),
                algorithm: key.algorithm.into(),
                key_file: PathBuf::from(format!(
                    "{DKIM_DIR}/{}",
                    key_file_name(&d.spec.domain, &key.selector)
                )),
            },
            allowed_users: d.spec.allowed_users.clone(),
            on_suppressed: d.spec.suppression.on_suppressed.into(),
            from_header: d.spec.from_header.into(),
            return_path_domain: d.spec.return_path_domain.clone(),
            rate_limits: rc::RateLimits {
                per_second: to_u32(limits.per_second),
                per_hour: to_u32(limits.per_hour),
                per_day: to_u32(limits.per_day),
                daily_quota: to_u32(limits.daily_quota),
            },
            tracking: d.spec.tracking.as_ref().map(|t| rc::DomainTracking {
                opens: t.opens,
                clicks: t.clicks,
                domain: t.domain.clone(),
                https: t.https,
            }),
            unsubscribe,
            feedback_id,
            reputation,
        });
    }
    sending.sort_by(|a, b| a.domain.cmp(&b.domain));
    let config = rc::RelayConfig {
        hostname: spec
            .hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{ns}.svc", base_name(relay))),
        listeners,
        tls: spec.tls_secret_name.as_ref().map(|_| rc::TlsFiles {
            cert_file: PathBuf::from(format!("{TLS_DIR}/tls.crt")),
            key_file: PathBuf::from(format!("{TLS_DIR}/tls.key")),
        }),
        auth_users_file: spec
            .auth_users_secret_name
            .as_ref()
            .map(|_| PathBuf::from(format!("{AUTH_DIR}/users"))),
        trusted_networks,
        domains: sending,
        queue: rc::QueueConfig {
            redis: Some(rc::RedisQueue {
                url: None,
                url_file: Some(PathBuf::from(format!("{REDIS_DIR}/url"))),
                key_prefix: spec.redis.key_prefix.clone(),
                wait_replicas: spec
                    .redis
                    .wait_replicas
                    .and_then(|w| u32::try_from(w).ok())
                    .unwrap_or(0),
                partitions: partitions(spec.redis.partitions)?,
            }),
            embedded: None,
            lease: rc::Duration::from_secs(600),
            timeout: rc::Duration::from_secs(5),
        },
        delivery,
        limits,
        tracking: rc::TrackingConfig {
            key_file: spec
                .tracking
                .as_ref()
                .map(|_| PathBuf::from(format!("{TRACKING_DIR}/key"))),
        },
        http: rc::HttpConfig {
            address: std::net::SocketAddr::from(([0, 0, 0, 0], HTTP_PORT as u16)),
            // The operator reads the reputation guard and resumes domains with it.
            admin_token_file: Some(feedback::admin_token_file()),
            ..Default::default()
        },
        events: events_config(spec.events.as_ref())?,
        // Always set: every pod must seal and open tokens with one key, and
        // domains may enable unsubscribe or a return path at any time.
        feedback: rc::FeedbackConfig {
            key_file: Some(feedback::key_file()),
        },
        // Sized from the pod's CPU limit, which the relay reads itself.
        worker_threads: None,
    };
    config.validate().map_err(|e| {
        let fields: Vec<String> = e.field_errors().iter().map(|f| f.to_string()).collect();
        InvalidSpec::new(
            "InvalidRelayConfig",
            format!(
                "the rendered relay config is invalid: {}",
                fields.join("; ")
            ),
        )
    })?;
    Ok(config)
}

/// The ConfigMap holding the rendered config.
pub fn config_map(relay: &SmtpRelay, config: &rc::RelayConfig) -> Result<ConfigMap, String> {
    let yaml = serde_yaml::to_string(config).map_err(|e| e.to_string())?;
    Ok(ConfigMap {
        metadata: meta(relay, config_map_name(relay)),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
        ..Default::default()
    })
}

/// The Secret aggregating the private keys of the bound domains, by file name.
pub fn dkim_secret(relay: &SmtpRelay, keys: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: meta(relay, dkim_secret_name(relay)),
        type_: Some("Opaque".into()),
        data: Some(
            keys.iter()
                .map(|(file, pem)| (file.clone(), ByteString(pem.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// FNV-1a, stable across operator versions and restarts (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Hash of what rolls the relay pods: the image, the resources, and the
/// startup part of the rendered config ([`rc::RelayConfig::startup`], the
/// same function the relay uses to decide that a reload needs a restart,
/// so the two cannot drift). Listener AUTH policy (`auth`,
/// `allowInsecureAuth`) is live in the relay too, but is hashed as well: a
/// change of who may relay should not wait for the kubelet to sync the
/// ConfigMap, and a rollout is how the operator can report (Progressing)
/// when every pod enforces it.
pub fn restart_hash(relay: &SmtpRelay, settings: &BuildSettings) -> String {
    // The startup part depends on the SmtpRelay alone, not on the bound
    // domains or the smarthost user name.
    let rendered = relay_config(relay, &[], None);
    let (startup, policy) = match &rendered {
        Ok(config) => (
            serde_json::to_value(config.startup()).unwrap_or_default(),
            config
                .listeners
                .iter()
                .map(|l| serde_json::json!([l.name, l.auth, l.allow_insecure_auth]))
                .collect(),
        ),
        // No config, no Deployment worth rolling; keep the hash stable.
        Err(e) => (serde_json::json!({ "invalid": e.to_string() }), Vec::new()),
    };
    let input = serde_json::json!({
        "image": image(relay, settings),
        "resources": relay.spec.resources,
        "startup": startup,
        "listenerAuth": policy,
    });
    format!("{:016x}", fnv1a(input.to_string().as_bytes()))
}

fn image(relay: &SmtpRelay, settings: &BuildSettings) -> String {
    relay
        .spec
        .image
        .clone()
        .unwrap_or_else(|| settings.relay_image.clone())
}

fn secret_volume(name: &str, secret: &str, items: Option<Vec<(&str, &str)>>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: items.map(|items| {
                items
                    .into_iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.into(),
                        path: path.into(),
                        mode: None,
                    })
                    .collect()
            }),
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn default_affinity(relay: &SmtpRelay) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(relay)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The relay Deployment: hardened pods mounting config, keys and secrets.
pub fn deployment(relay: &SmtpRelay, settings: &BuildSettings) -> Deployment {
    let spec = &relay.spec;
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(relay),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
        secret_volume("dkim", &dkim_secret_name(relay), None),
        secret_volume("feedback", &feedback_secret_name(relay), None),
        secret_volume(
            "redis",
            &spec.redis.url_secret_ref.name,
            Some(vec![(spec.redis.url_secret_ref.key.as_str(), "url")]),
        ),
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("dkim", DKIM_DIR),
        mount("feedback", feedback::FEEDBACK_DIR),
        mount("redis", REDIS_DIR),
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if let Some(tls) = &spec.tls_secret_name {
        volumes.push(secret_volume("tls", tls, None));
        mounts.push(mount("tls", TLS_DIR));
    }
    if let Some(users) = &spec.auth_users_secret_name {
        volumes.push(secret_volume("auth", users, Some(vec![("users", "users")])));
        mounts.push(mount("auth", AUTH_DIR));
    }
    if let Some(tracking) = &spec.tracking {
        volumes.push(secret_volume(
            "tracking",
            &tracking.key_secret_name,
            Some(vec![("key", "key")]),
        ));
        mounts.push(mount("tracking", TRACKING_DIR));
    }
    if let Some(creds) = spec
        .delivery
        .smarthost
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())
    {
        volumes.push(secret_volume(
            "smarthost",
            &creds.name,
            Some(vec![("password", "password")]),
        ));
        mounts.push(mount("smarthost", SMARTHOST_DIR));
    }
    if let Some(webhooks) = webhook_volume(spec.events.as_ref()) {
        volumes.push(webhooks);
        mounts.push(mount("webhooks", WEBHOOKS_DIR));
    }
    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: l.effective_target_port(),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    if let Some(f) = &spec.feedback {
        ports.push(ContainerPort {
            name: Some(feedback::LISTENER_NAME.into()),
            container_port: f.effective_target_port(),
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    ports.push(ContainerPort {
        name: Some("http".into()),
        container_port: HTTP_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    });
    let mut annotations = spec.pod_annotations.clone().unwrap_or_default();
    annotations.insert(
        RESTART_HASH_ANNOTATION.into(),
        restart_hash(relay, settings),
    );
    let container = Container {
        name: "relay".into(),
        image: Some(image(relay, settings)),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(relay, base_name(relay)),
        spec: Some(DeploymentSpec {
            // With autoscaling the HPA owns the replica count: leave it out of the apply.
            replicas: spec
                .autoscaling
                .is_none()
                .then(|| spec.effective_replicas()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(relay)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(relay)),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    affinity: Some(
                        spec.affinity
                            .clone()
                            .unwrap_or_else(|| default_affinity(relay)),
                    ),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service apps send to: every listener port plus `http` for metrics.
pub fn service(relay: &SmtpRelay) -> Service {
    let mut ports: Vec<ServicePort> = relay
        .spec
        .listeners
        .iter()
        .map(|l| ServicePort {
            name: Some(l.name.clone()),
            port: l.port,
            target_port: Some(IntOrString::Int(l.effective_target_port())),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    ports.push(ServicePort {
        name: Some("http".into()),
        port: HTTP_PORT,
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    });
    Service {
        metadata: meta(relay, base_name(relay)),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(relay)),
            ports: Some(ports),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one relay pod voluntarily down at a time.
pub fn pdb(relay: &SmtpRelay) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(relay, base_name(relay)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(relay)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The HPA, when `autoscaling` is set.
pub fn hpa(relay: &SmtpRelay) -> Option<HorizontalPodAutoscaler> {
    let scaling = relay
        .spec
        .autoscaling
        .as_ref()
        .filter(|a| a.engine == sr::AutoscalingEngine::Hpa)?;
    Some(HorizontalPodAutoscaler {
        metadata: meta(relay, base_name(relay)),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: base_name(relay),
            },
            min_replicas: Some(scaling.min_replicas),
            max_replicas: scaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(scaling.target_cpu_utilization_percentage),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The prometheus-operator ServiceMonitor scraping `/metrics`, when asked for.
pub fn service_monitor(relay: &SmtpRelay) -> Option<serde_json::Value> {
    if !relay.spec.monitoring.service_monitor {
        return None;
    }
    let meta = meta(relay, base_name(relay));
    Some(serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(relay)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }))
}

/// Test fixtures.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn relay(yaml_spec: &str) -> SmtpRelay {
        let mut relay: SmtpRelay = serde_yaml::from_str(&format!(
            "apiVersion: petrel.dev/v1alpha1\nkind: SmtpRelay\nmetadata: {{name: main, namespace: mail, uid: 1234, generation: 1}}\nspec: {yaml_spec}"
        ))
        .expect("relay fixture");
        relay.metadata.resource_version = Some("1".into());
        relay
    }

    pub fn settings() -> BuildSettings {
        BuildSettings {
            relay_image: "ghcr.io/petrel/relay:0.1.0".into(),
        }
    }

    pub fn bound(domain: &str, selector: &str) -> BoundDomain {
        BoundDomain {
            spec: serde_yaml::from_str(&format!("{{domain: {domain}, relayRef: {{name: main}}}}"))
                .expect("domain fixture"),
            active_key: DkimKeyEntry {
                selector: selector.into(),
                algorithm: petrel_crds::status::DkimAlgorithm::Ed25519,
                secret_name: format!("{domain}-{selector}"),
                dns_value: "v=DKIM1; k=ed25519; p=x".into(),
                phase: petrel_crds::status::DkimKeyPhase::Active,
                created_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                published_at: None,
                activated_at: None,
                retired_at: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    const SPEC: &str = "{redis: {urlSecretRef: {name: redis, key: url}}, listeners: [{name: smtp, port: 25}, {name: submission, port: 587, tls: starttls, auth: required}], tlsSecretName: tls, authUsersSecretName: users, trustedNetworks: [10.0.0.0/8], delivery: {retrySchedule: [1m, 5m]}}";

    #[test]
    fn relay_config_renders_listeners_domains_and_paths() {
        let relay = relay(SPEC);
        let config = relay_config(
            &relay,
            &[bound("b.example", "s2"), bound("a.example", "s1")],
            None,
        )
        .expect("renders");
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.listeners[0].address.port(), 10025);
        assert_eq!(config.listeners[1].tls, rc::TlsMode::Starttls);
        assert_eq!(config.listeners[1].auth, rc::AuthMode::Required);
        assert_eq!(config.domains[0].domain, "a.example");
        assert_eq!(
            config.domains[0].dkim.key_file,
            PathBuf::from("/etc/petrel/dkim/a.example.s1.pem")
        );
        assert_eq!(config.domains[1].dkim.selector, "s2");
        assert_eq!(
            config.tls.as_ref().map(|t| t.cert_file.clone()),
            Some(PathBuf::from("/etc/petrel/tls/tls.crt"))
        );
        let redis = config.queue.redis.as_ref().expect("redis queue");
        assert_eq!(redis.url_file, Some(PathBuf::from("/etc/petrel/redis/url")));
        assert_eq!(config.delivery.retry_schedule.len(), 2);
        assert_eq!(config.http.address.port(), 9090);
        assert_eq!(config.hostname, "petrel-main.mail.svc");
        // What the operator writes, the relay reads back identically.
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert_eq!(
            rc::RelayConfig::from_yaml(&yaml).expect("relay accepts it"),
            config
        );
    }

    const EVENTS_SPEC: &str = "{redis: {urlSecretRef: {name: redis, key: url}}, events: {retention: 2d, webhooks: [{name: app, url: 'https://hooks.example.com/petrel', types: [delivered, bounced], secretRef: {name: hook-secrets, key: app}}, {name: crm, url: 'http://crm.apps.svc.cluster.local/events', secretRef: {name: crm, key: token}}]}}";

    #[test]
    fn webhooks_render_into_the_config_the_relay_loads() {
        let relay = relay(EVENTS_SPEC);
        let config = relay_config(&relay, &[], None).expect("renders");
        assert_eq!(config.events.retention.as_secs(), 2 * 86_400);
        let hooks = &config.events.webhooks;
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].name, "app");
        assert_eq!(hooks[0].url, "https://hooks.example.com/petrel");
        assert_eq!(
            hooks[0].secret_file,
            PathBuf::from("/etc/petrel/webhooks/app")
        );
        assert_eq!(
            hooks[0].types,
            Some(vec!["delivered".to_string(), "bounced".to_string()])
        );
        assert_eq!(hooks[1].types, None);
        assert_eq!(
            hooks[1].secret_file,
            PathBuf::from("/etc/petrel/webhooks/crm")
        );
        let yaml = config.to_yaml().expect("serializes");
        assert_eq!(
            rc::RelayConfig::from_yaml(&yaml).expect("relay accepts it"),
            config
        );
        // Without spec.events the section is left out entirely.
        let plain = relay_config(&relay_without_events(), &[], None).expect("renders");
        assert!(!plain.to_yaml().unwrap().contains("events"));
    }

    #[test]
    fn redis_partitions_come_from_the_spec_and_default_to_16() {
        let partitions = |spec: &str| {
            relay_config(&relay(spec), &[], None)
                .map(|c| c.queue.redis.expect("redis queue").partitions)
                .map_err(|e| e.message)
        };
        assert_eq!(
            partitions("{redis: {urlSecretRef: {name: redis, key: url}}}"),
            Ok(16)
        );
        assert_eq!(
            partitions("{redis: {urlSecretRef: {name: redis, key: url}, partitions: 4}}"),
            Ok(4)
        );
        let refused = partitions("{redis: {urlSecretRef: {name: redis, key: url}, partitions: 0}}");
        assert!(
            refused
                .as_ref()
                .is_err_and(|m| m.starts_with("spec.redis.partitions: 0 is out of range")),
            "{refused:?}"
        );
    }

    fn relay_without_events() -> SmtpRelay {
        relay("{redis: {urlSecretRef: {name: redis, key: url}}}")
    }

    #[test]
    fn webhook_secrets_are_mounted_read_only_one_file_per_webhook() {
        let d = deployment(&relay(EVENTS_SPEC), &settings());
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "webhooks")
            .expect("webhooks volume");
        let sources = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .unwrap();
        let files: Vec<(String, String, String)> = sources
            .iter()
            .filter_map(|s| s.secret.as_ref())
            .flat_map(|s| {
                s.items
                    .iter()
                    .flatten()
                    .map(move |i| (s.name.clone(), i.key.clone(), i.path.clone()))
            })
            .collect();
        assert_eq!(
            files,
            [
                ("hook-secrets".into(), "app".into(), "app".into()),
                ("crm".into(), "token".into(), "crm".into())
            ]
        );
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "webhooks")
            .expect("mounted");
        assert_eq!(mount.mount_path, WEBHOOKS_DIR);
        assert_eq!(mount.read_only, Some(true));
        // No webhooks, no volume.
        let d = deployment(&relay_without_events(), &settings());
        let pod = d.spec.and_then(|s| s.template.spec).unwrap();
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "webhooks"));
    }

    #[test]
    fn a_plain_http_webhook_outside_the_cluster_is_an_invalid_spec() {
        let relay = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, events: {webhooks: [{name: app, url: 'http://hooks.example.com/', secretRef: {name: s, key: k}}]}}",
        );
        let err = relay_config(&relay, &[], None).expect_err("invalid");
        assert_eq!(err.reason, "InvalidRelayConfig");
        assert!(
            err.message.contains("events.webhooks[0].url"),
            "{}",
            err.message
        );
    }

    #[test]
    fn tls_rpt_switch_and_reporter_render() {
        let relay = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, delivery: {tlsRpt: false, tlsReport: {organizationName: Example Org, contactInfo: tls@example.org}}}",
        );
        let config = relay_config(&relay, &[], None).expect("renders");
        assert!(!config.delivery.tls_rpt);
        assert_eq!(
            config.delivery.tls_report,
            rc::TlsReportConfig {
                organization_name: Some("Example Org".into()),
                contact_info: Some("tls@example.org".into()),
            }
        );
    }

    #[test]
    fn outbound_tls_modes_and_per_destination_policies_render() {
        let relay = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, delivery: {outboundTls: required, mtaSts: false, dane: false, tlsPolicies: [{domain: bank.example, mode: encrypted}]}}",
        );
        let config = relay_config(&relay, &[], None).expect("renders");
        // `required` is the old name of `verified`.
        assert_eq!(config.delivery.outbound_tls, rc::OutboundTls::Verified);
        assert!(!config.delivery.mta_sts);
        assert!(!config.delivery.dane);
        assert!(config.delivery.tls_rpt, "TLS-RPT on by default");
        assert_eq!(
            config.delivery.tls.policies,
            vec![rc::TlsPolicyOverride {
                domain: "bank.example".into(),
                mode: rc::OutboundTls::Encrypted,
            }]
        );
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert!(yaml.contains("outboundTls: verified"), "{yaml}");
        assert_eq!(
            rc::RelayConfig::from_yaml(&yaml).expect("relay accepts it"),
            config
        );
    }

    #[test]
    fn bad_trusted_network_is_an_invalid_spec() {
        let relay = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, trustedNetworks: [10.0.0.0/99]}",
        );
        let err = relay_config(&relay, &[], None).expect_err("invalid");
        assert_eq!(err.reason, "InvalidTrustedNetwork");
        assert!(err.message.contains("spec.trustedNetworks[0]"));
    }

    #[test]
    fn deployment_is_hardened_and_probed() {
        let relay = relay(SPEC);
        let d = deployment(&relay, &settings());
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.automount_service_account_token, Some(false));
        let psc = pod.security_context.expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.expect("seccomp").type_,
            "RuntimeDefault"
        );
        let c = &pod.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness");
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        let liveness = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("liveness");
        assert_eq!(liveness.path.as_deref(), Some("/healthz"));
        let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [10025, 10587, 9090]);
        let anti = pod
            .affinity
            .and_then(|a| a.pod_anti_affinity)
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .expect("default anti-affinity");
        assert_eq!(
            anti[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        let volumes: Vec<String> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        assert_eq!(
            volumes,
            ["config", "dkim", "feedback", "redis", "tmp", "tls", "auth"]
        );
        assert_eq!(
            d.metadata.owner_references.expect("owner")[0].controller,
            Some(true)
        );
    }

    #[test]
    fn restart_hash_covers_only_what_needs_a_restart() {
        let base = relay(SPEC);
        let hash = restart_hash(&base, &settings());
        // Config-only changes (delivery, limits, trusted networks) keep the hash.
        let config_only = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, listeners: [{name: smtp, port: 25}, {name: submission, port: 587, tls: starttls, auth: required}], tlsSecretName: tls, authUsersSecretName: users, trustedNetworks: [192.168.0.0/16], limits: {maxRecipients: 5}}",
        );
        assert_eq!(restart_hash(&config_only, &settings()), hash);
        let mut image = base.clone();
        image.spec.image = Some("other:1".into());
        assert_ne!(restart_hash(&image, &settings()), hash);
        let mut ports = base.clone();
        ports.spec.listeners[0].port = 2525;
        assert_ne!(restart_hash(&ports, &settings()), hash);
        // Startup settings of the rendered config: the key prefix.
        let mut prefix = base.clone();
        prefix.spec.redis.key_prefix = "other".into();
        assert_ne!(restart_hash(&prefix, &settings()), hash);
    }

    #[test]
    fn an_auth_change_rolls_the_deployment() {
        let template_hash = |relay: &SmtpRelay| {
            deployment(relay, &settings())
                .spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .and_then(|a| a.get(RESTART_HASH_ANNOTATION).cloned())
                .expect("pod template carries the restart hash")
        };
        let base = relay(SPEC);
        let mut optional = base.clone();
        optional.spec.listeners[1].auth = sr::AuthMode::Optional;
        assert_ne!(template_hash(&optional), template_hash(&base));
        let mut insecure = base.clone();
        insecure.spec.listeners[1].allow_insecure_auth = true;
        assert_ne!(template_hash(&insecure), template_hash(&base));
        assert_eq!(template_hash(&base.clone()), template_hash(&base));
    }

    #[test]
    fn autoscaling_builds_hpa_and_leaves_replicas_to_it() {
        let relay = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, autoscaling: {minReplicas: 2, maxReplicas: 6}}",
        );
        let hpa = hpa(&relay).expect("hpa");
        let spec = hpa.spec.expect("spec");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
        assert_eq!(spec.scale_target_ref.name, "petrel-main");
        assert_eq!(
            deployment(&relay, &settings()).spec.expect("spec").replicas,
            None
        );
        assert!(super::hpa(&super::fixtures::relay(SPEC)).is_none());
    }

    #[test]
    fn service_pdb_and_endpoints() {
        let relay = relay(SPEC);
        let svc = service(&relay).spec.expect("spec");
        let ports: Vec<(i32, Option<IntOrString>)> = svc
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.target_port.clone()))
            .collect();
        assert_eq!(ports[0], (25, Some(IntOrString::Int(10025))));
        assert_eq!(ports[2].0, 9090);
        assert_eq!(
            pdb(&relay).spec.expect("spec").max_unavailable,
            Some(IntOrString::Int(1))
        );
        assert_eq!(
            endpoints(&relay),
            ["petrel-main.mail.svc:25", "petrel-main.mail.svc:587"]
        );
        let keys = BTreeMap::from([(key_file_name("a.example", "s1"), "PEM".to_string())]);
        let secret = dkim_secret(&relay, &keys);
        assert!(secret.data.expect("data").contains_key("a.example.s1.pem"));
    }

    #[test]
    fn service_monitor_only_when_asked() {
        assert!(service_monitor(&relay(SPEC)).is_none());
        let monitored = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, monitoring: {serviceMonitor: true}}",
        );
        let sm = service_monitor(&monitored).expect("service monitor");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
        assert_eq!(sm["metadata"]["ownerReferences"][0]["kind"], "SmtpRelay");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
            "main"
        );
    }
}
