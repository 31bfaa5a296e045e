//! `SmtpRelay`: a pool of relay pods sharing one Redis queue, with its
//! listeners, delivery policy and limits. The operator renders it (plus every
//! bound SendingDomain) into a RelayConfig ConfigMap, a DKIM key Secret, a
//! Deployment, a Service, a PodDisruptionBudget and optionally an HPA.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// Condition type: enough relay pods are ready to accept mail.
pub const CONDITION_AVAILABLE: &str = "Available";
/// Condition type: a rollout or scale change is under way.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong that needs a person (bad spec, missing Secret, failed apply).
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Degraded reason: a Secret the relay references does not exist.
pub const REASON_SECRET_MISSING: &str = "SecretMissing";
/// Degraded reason: a referenced Secret lacks a key, or a key's value is empty or malformed.
pub const REASON_SECRET_INVALID: &str = "SecretInvalid";
/// Degraded and Progressing reason: the Deployment did not progress within its
/// `progressDeadlineSeconds` (the Deployment controller's own reason).
pub const REASON_PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
/// Degraded reason when nothing is wrong.
pub const REASON_AS_EXPECTED: &str = "AsExpected";
/// Progressing reason: the Deployment is rolling out or scaling.
pub const REASON_ROLLING_OUT: &str = "RollingOut";
/// Progressing reason: every pod runs the current template and is available.
pub const REASON_ROLLOUT_COMPLETE: &str = "RolloutComplete";
/// Available reason: at least the minimum of relay pods is available.
pub const REASON_MINIMUM_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
/// Available reason: fewer relay pods are available than the minimum.
pub const REASON_MINIMUM_REPLICAS_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
/// Available reason: no relay pod is ready.
pub const REASON_NO_READY_REPLICAS: &str = "NoReadyReplicas";

/// Replicas used when neither `replicas` nor `autoscaling` is set.
pub const DEFAULT_REPLICAS: i32 = 2;

/// Desired state of a pool of Petrel SMTP relay pods.
// Several printcolumns share `type_ = "string"`, which this lint misreads as a repeat.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.dev",
    version = "v1alpha1",
    kind = "SmtpRelay",
    namespaced,
    status = "SmtpRelayStatus",
    derive = "PartialEq",
    shortname = "smtprelay",
    category = "petrel",
    doc = "A pool of Petrel SMTP relay pods sharing one Redis queue. Apps send to the Service `petrel-<name>` on the listener ports; SendingDomains bind to it by name.",
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Available")].status"#,
        description = "Whether enough relay pods are ready"
    ),
    printcolumn(
        name = "REPLICAS",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready relay pods"
    ),
    printcolumn(
        name = "ENDPOINT",
        type_ = "string",
        json_path = ".status.endpoints[0]",
        description = "First listener address"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("set either replicas or autoscaling, not both").field_path(".replicas"),
    validation = Rule::new("!self.listeners.exists(l, l.tls != 'none') || has(self.tlsSecretName)").message("listeners with tls starttls or implicit need tlsSecretName").field_path(".tlsSecretName"),
    validation = Rule::new("!self.listeners.exists(l, l.auth != 'none') || has(self.authUsersSecretName)").message("listeners with auth optional or required need authUsersSecretName").field_path(".authUsersSecretName"),
    validation = Rule::new("!has(self.feedback) || !self.listeners.exists(l, l.name == 'feedback')").message("the listener name feedback is taken by spec.feedback").field_path(".listeners"),
    validation = Rule::new("!has(self.feedback) || !self.listeners.exists(l, (has(l.targetPort) ? l.targetPort : (l.port >= 1024 ? l.port : l.port + 10000)) == (has(self.feedback.targetPort) ? self.feedback.targetPort : 11025))").message("spec.feedback.targetPort must differ from every listener's targetPort").field_path(".feedback.targetPort")
)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRelaySpec {
    /// Fixed number of relay pods. Leave unset when `autoscaling` is set; defaults to 2 when neither is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,

    /// Scale relay pods (on CPU with an HPA, or on the queue with KEDA) instead of a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Relay container image. Defaults to the image the operator was started with (`--relay-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// When the kubelet pulls the image: Always, IfNotPresent or Never (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// CPU and memory requests and limits of the relay container. Changing them restarts the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the relay pods must be scheduled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Scheduling affinity of the relay pods. When unset, pods prefer to spread across nodes
    /// (preferred pod anti-affinity on `kubernetes.io/hostname`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Extra annotations on relay pods (for example for a service mesh or log shipping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// The Redis server holding the shared queue.
    pub redis: RedisSpec,

    /// SMTP listeners: each becomes a Service port. Defaults to one plaintext, unauthenticated
    /// listener `smtp` on port 25 for trusted networks.
    #[serde(default = "default_listeners")]
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(l, self.exists_one(m, m.port == l.port))").message("listener ports must be unique").reason(Reason::FieldValueDuplicate)
    )]
    pub listeners: Vec<ListenerSpec>,

    /// Secret of type kubernetes.io/tls (`tls.crt`, `tls.key`) for STARTTLS and implicit TLS
    /// listeners; a cert-manager Certificate's Secret works as is. Renewals are picked up without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret_name: Option<String>,

    /// Secret with key `users` holding one `username:argon2-hash` per line, for SMTP AUTH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub auth_users_secret_name: Option<String>,

    /// Client networks (CIDR, for example `10.0.0.0/8`) allowed to relay without AUTH.
    /// Empty means every client must authenticate.
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(length(max = 43), regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"))
    )]
    pub trusted_networks: Vec<String>,

    /// How queued mail leaves the relay.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// Per-pod limits on messages and connections.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Public IP addresses mail leaves the cluster from (NAT gateway, egress gateway).
    /// They become `ip4:`/`ip6:` mechanisms in every bound SendingDomain's SPF record.
    #[serde(default)]
    #[schemars(
        length(max = 32),
        inner(length(max = 39), regex(pattern = r"^[0-9a-fA-F:.]+$"))
    )]
    pub egress_ips: Vec<String>,

    /// Prometheus integration.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Name the relay announces in EHLO and uses in Received headers and DSNs.
    /// Should resolve to an egress IP and match its PTR record. Defaults to the pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub hostname: Option<String>,

    /// Engagement tracking: the public host tracked links and pixels reach the relay's HTTP port
    /// through, and the token key. Needed when a bound SendingDomain sets `spec.tracking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::tracking::RelayTrackingSpec>,
    /// The event log and the signed webhooks every relay pod sends events to (delivered, bounced,
    /// deferred, ...). Each event reaches each webhook at least once, from one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,
    /// The feedback listener (`role: feedback`): the MX target of every bound SendingDomain's
    /// `returnPathDomain`, receiving asynchronous bounces (DSNs), complaint reports (ARF) and
    /// mailto unsubscribes. Served by its own Service `petrel-<name>-feedback`, which must be
    /// reachable from the internet on port 25 at `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<RelayFeedbackSpec>,
}

/// Container port of the feedback listener when `spec.feedback.targetPort` is unset: away from
/// the `port + 10000` listeners get by default (so 25 for both does not collide).
pub const DEFAULT_FEEDBACK_TARGET_PORT: i32 = 11025;

/// The relay's feedback listener and the Service exposing it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayFeedbackSpec {
    /// Public host name receiving mail for the return-path domains, for example
    /// `feedback.petrel.example.net`: each return-path domain gets an MX record pointing here
    /// (listed in the SendingDomain's `status.dnsRecords`). It must resolve to the address of
    /// the feedback Service (the LoadBalancer's IP, or whatever forwards port 25 to it).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub hostname: String,
    /// Service port of the feedback listener. Mail servers deliver to port 25 (the default).
    #[serde(default = "default_feedback_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port the feedback listener binds inside the pod; defaults to 11025. Must differ from
    /// every listener's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub target_port: Option<i32>,
    /// Type of the Service `petrel-<name>-feedback`: LoadBalancer (default, a public address
    /// for the MX), NodePort, or ClusterIP (when something else forwards port 25 to it).
    #[serde(default)]
    pub service_type: FeedbackServiceType,
    /// Annotations of the feedback Service, for example a cloud load balancer's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_annotations: Option<BTreeMap<String, String>>,
}

impl RelayFeedbackSpec {
    /// The port the feedback listener binds in the pod (see `targetPort`).
    pub fn effective_target_port(&self) -> i32 {
        self.target_port.unwrap_or(DEFAULT_FEEDBACK_TARGET_PORT)
    }
}

fn default_feedback_port() -> i32 {
    25
}

/// Type of the feedback Service.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FeedbackServiceType {
    /// A cloud load balancer with a public address.
    #[default]
    LoadBalancer,
    /// A port on every node.
    NodePort,
    /// In-cluster only; something else must forward port 25 to it.
    ClusterIP,
}

impl FeedbackServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
            Self::ClusterIP => "ClusterIP",
        }
    }
}

/// Event retention and webhooks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("self.webhooks.all(w, self.webhooks.exists_one(x, x.name == w.name))").message("webhook names must be unique").field_path(".webhooks"))]
#[serde(rename_all = "camelCase")]
pub struct EventsSpec {
    /// How long events are kept in Redis, for example `3d` (the default). Events a webhook has not
    /// acknowledged yet are kept longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub retention: Option<String>,

    /// HTTP endpoints that receive events as signed JSON batches (`Petrel-Signature` header).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub webhooks: Vec<WebhookSpec>,
}

/// One webhook endpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Unique name of the webhook (a DNS label). Labels its metrics; renaming it sends the
    /// retained events again.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Where batches are POSTed: `https://...`, or `http://` to an in-cluster Service
    /// (`*.svc`, `*.svc.cluster.local`).
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,

    /// Event types to send, for example `[delivered, bounced, complained]`. All types when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 12),
        inner(regex(
            pattern = r"^(accepted|rejected|delivered|deferred|delayed|bounced|suppressed|dsn|complained|unsubscribed|opened|clicked|deleted)$"
        ))
    )]
    pub types: Option<Vec<String>>,

    /// Secret key holding the HMAC-SHA256 signing secret shared with the receiver. Mounted into
    /// the relay pods; a changed Secret is picked up without a restart.
    pub secret_ref: SecretKeyRef,
}

fn default_listeners() -> Vec<ListenerSpec> {
    vec![ListenerSpec {
        name: "smtp".into(),
        port: 25,
        target_port: None,
        tls: TlsMode::None,
        auth: AuthMode::None,
        allow_insecure_auth: false,
    }]
}

impl SmtpRelaySpec {
    /// Replicas for the Deployment when not autoscaling.
    pub fn effective_replicas(&self) -> i32 {
        self.replicas.unwrap_or(DEFAULT_REPLICAS)
    }
}

/// Autoscaling of the relay pods: bounds, and what drives it (CPU or the queue).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas").field_path(".minReplicas"),
    validation = Rule::new("self.engine != 'keda' || has(self.prometheus)").message("engine keda needs prometheus.serverAddress").field_path(".prometheus")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Lowest number of relay pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Highest number of relay pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation (percent of requests) the autoscaler aims for.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    #[serde(rename = "targetCPUUtilizationPercentage")]
    pub target_cpu_utilization_percentage: i32,
    /// What scales the pods: `hpa` (a HorizontalPodAutoscaler on CPU, the default) or `keda`
    /// (a KEDA ScaledObject on the number of due queue units; needs KEDA installed).
    #[serde(default)]
    pub engine: AutoscalingEngine,
    /// With `engine: keda`: due queue units (`petrel_queue_units{state="due"}`) one pod should
    /// handle; KEDA runs `ceil(due / targetDuePerPod)` pods between the bounds.
    #[serde(default = "default_target_due_per_pod")]
    #[schemars(range(min = 1, max = 1000000))]
    pub target_due_per_pod: i32,
    /// With `engine: keda`: the Prometheus that scrapes the relay pods, queried by KEDA's
    /// Prometheus scaler. Required with `engine: keda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusTriggerSpec>,
}

/// What scales the relay pods.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingEngine {
    /// A HorizontalPodAutoscaler on CPU utilisation.
    #[default]
    Hpa,
    /// A KEDA ScaledObject on the queue's due units, read from Prometheus.
    Keda,
}

/// Where KEDA reads the relay's queue metric from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusTriggerSpec {
    /// URL of the Prometheus HTTP API, for example
    /// `http://prometheus-operated.monitoring.svc:9090`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^https?://"))]
    pub server_address: String,
    /// PromQL giving the relay's due units. Defaults to
    /// `max(petrel_queue_units{state="due",namespace="<ns>",service="<relay Service>"})`
    /// (every pod reports the whole shared queue, hence `max`), which matches the labels a
    /// prometheus-operator ServiceMonitor adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: Option<String>,
}

fn default_target_due_per_pod() -> i32 {
    100
}

fn default_min_replicas() -> i32 {
    2
}

fn default_target_cpu() -> i32 {
    70
}

/// When the kubelet pulls the relay image: Always, IfNotPresent or Never.
/// Unset means the Kubernetes default (Always for `:latest`, IfNotPresent otherwise).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node lacks the image.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Reference to one key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Reference to a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Connection to the Redis server (standalone, Sentinel or Cluster) that holds the queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret key holding the Redis URL, for example `redis://:password@redis:6379/0`, `redis+sentinel://s1:26379,s2:26379/mymaster` or `redis+cluster://n1:6379,n2:6379`.
    pub url_secret_ref: SecretKeyRef,
    /// Prefix of every queue key, so several relays can share one Redis. Keys carry hash tags,
    /// so Redis Cluster works.
    #[serde(default = "default_key_prefix")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub key_prefix: String,
    /// When set, a message is acknowledged (250 after DATA) only once this many Redis replicas
    /// confirmed the write (Redis WAIT). Trades latency for durability across a primary failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub wait_replicas: Option<i32>,
    /// Partitions of the queue, each under its own `{prefix:N:…}` hash tag, so Redis Cluster
    /// spreads messages, bodies and indexes over every master (default 16). Safe to change on a
    /// live queue: partitions used before are still drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: Option<i32>,
}

fn default_key_prefix() -> String {
    "petrel".into()
}

/// TLS mode of a listener or of a connection to a smarthost.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plaintext only.
    #[default]
    None,
    /// Plaintext, upgraded with the STARTTLS command (ports 25 and 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// Whether a listener offers or requires SMTP AUTH.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// AUTH is not offered; only trusted networks may relay.
    #[default]
    None,
    /// AUTH is offered; trusted networks may relay without it.
    Optional,
    /// Every client must authenticate before MAIL FROM, even from trusted networks.
    Required,
}

/// One SMTP listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.auth == 'none' || self.tls != 'none' || self.allowInsecureAuth").message("AUTH on a listener without TLS sends passwords in clear text: set tls to starttls or implicit, or allowInsecureAuth: true"))]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Name of the listener, used as the Service port name (lowercase, at most 15 characters).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Service port clients connect to, for example 25, 587 or 465.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port the relay binds inside the pod. Pods run without privileges, so it defaults to
    /// `port` when that is 1024 or above and to `port + 10000` otherwise (25 becomes 10025).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub target_port: Option<i32>,
    /// TLS on this listener: none, starttls or implicit.
    #[serde(default)]
    pub tls: TlsMode,
    /// SMTP AUTH on this listener: none, optional or required.
    #[serde(default)]
    pub auth: AuthMode,
    /// Allow AUTH before TLS is established. Only for networks where clear text is acceptable.
    #[serde(default)]
    pub allow_insecure_auth: bool,
}

impl ListenerSpec {
    /// The port the relay process binds in the pod (see `targetPort`).
    pub fn effective_target_port(&self) -> i32 {
        match self.target_port {
            Some(port) => port,
            None if self.port >= 1024 => self.port,
            None => self.port + 10000,
        }
    }
}

/// How queued mail is delivered.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Look up each recipient domain's MX records and deliver directly.
    #[default]
    Mx,
    /// Hand every message to one upstream server.
    Smarthost,
}

/// TLS policy for outbound connections to recipient servers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    /// Use STARTTLS when offered, fall back to plaintext otherwise; any certificate.
    #[default]
    Opportunistic,
    /// TLS mandatory, any certificate: defer rather than send in plain text.
    Encrypted,
    /// TLS mandatory and the certificate verified against the MX host name (Mozilla roots).
    Verified,
    /// Alias of verified (before 0.2 it meant TLS mandatory with any certificate).
    Required,
}

/// Outbound TLS mode for one recipient domain.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsPolicySpec {
    /// Recipient domain, for example `bank.example` (exact match, case-insensitive).
    #[schemars(length(min = 1, max = 253))]
    pub domain: String,
    /// TLS mode for mail to that domain: opportunistic, encrypted, verified (or required, an alias of verified).
    pub mode: OutboundTls,
}

/// Who TLS-RPT reports say they are from (RFC 8460 section 4.4).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsReportSpec {
    /// `organization-name` of the reports. The relay's hostname when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub organization_name: Option<String>,
    /// `contact-info` of the reports: an address (also the reports' From) or a URL.
    /// `postmaster@` the relay's hostname when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub contact_info: Option<String>,
}

/// Upstream server that receives all mail when `transport` is `smarthost`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SmarthostSpec {
    /// Host name or IP address of the smarthost.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port of the smarthost.
    #[serde(default = "default_smarthost_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// TLS towards the smarthost: none, starttls or implicit.
    #[serde(default = "default_smarthost_tls")]
    pub tls: TlsMode,
    /// Secret with keys `username` and `password` for AUTH at the smarthost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

fn default_smarthost_port() -> i32 {
    587
}

fn default_smarthost_tls() -> TlsMode {
    TlsMode::Starttls
}

/// Pattern of a human-readable duration such as `30s`, `5m`, `4h`, `5d` or `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(s|m|h|d|w))+$";

/// Delivery policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.transport != 'smarthost' || has(self.smarthost)").message("transport smarthost needs smarthost.host").field_path(".smarthost"),
    validation = Rule::new("self.transport == 'smarthost' || !has(self.smarthost)").message("smarthost is only used with transport: smarthost").field_path(".smarthost")
)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// mx delivers to each recipient domain's MX hosts; smarthost hands all mail to `smarthost`.
    #[serde(default)]
    pub transport: Transport,
    /// The upstream server, required when `transport` is `smarthost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<SmarthostSpec>,
    /// Delays between delivery attempts after a temporary failure, for example `[5m, 10m, 30m, 1h]`.
    /// The last entry repeats until `maxQueueLifetime`.
    #[serde(default = "default_retry_schedule")]
    #[schemars(
        length(min = 1, max = 32),
        inner(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))
    )]
    pub retry_schedule: Vec<String>,
    /// How long a message may stay queued before it bounces to its sender, for example `5d`.
    #[serde(default = "default_max_queue_lifetime")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub max_queue_lifetime: String,
    /// Concurrent outbound connections per destination domain and pod.
    #[serde(default = "default_per_destination_concurrency")]
    #[schemars(range(min = 1, max = 1000))]
    pub per_destination_concurrency: i32,
    /// Default outbound TLS: opportunistic uses STARTTLS when offered; encrypted defers mail to
    /// servers without it; verified also defers when the certificate does not chain to a Mozilla
    /// root or does not name the MX host. required is an alias of verified.
    #[serde(default)]
    pub outbound_tls: OutboundTls,
    /// Per-destination overrides of outboundTls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub tls_policies: Vec<TlsPolicySpec>,
    /// Honour recipient domains' MTA-STS policies (RFC 8461).
    #[serde(default = "default_mta_sts")]
    pub mta_sts: bool,
    /// Count outbound TLS results per recipient policy domain and send the daily TLS-RPT
    /// (RFC 8460) report to each domain's `_smtp._tls` address.
    #[serde(default = "default_tls_rpt")]
    pub tls_rpt: bool,
    /// Organisation name and contact in the TLS-RPT reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_report: Option<TlsReportSpec>,
    /// DANE (RFC 7672): where an MX host publishes DNSSEC-validated TLSA records, require TLS
    /// with a certificate matching them (wins over MTA-STS and outboundTls for that host).
    #[serde(default = "default_dane")]
    pub dane: bool,
}

fn default_dane() -> bool {
    true
}

fn default_mta_sts() -> bool {
    true
}

fn default_tls_rpt() -> bool {
    true
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            transport: Transport::Mx,
            smarthost: None,
            retry_schedule: default_retry_schedule(),
            max_queue_lifetime: default_max_queue_lifetime(),
            per_destination_concurrency: default_per_destination_concurrency(),
            outbound_tls: OutboundTls::Opportunistic,
            tls_policies: Vec::new(),
            mta_sts: true,
            dane: true,
            tls_rpt: true,
            tls_report: None,
        }
    }
}

fn default_retry_schedule() -> Vec<String> {
    ["5m", "10m", "30m", "1h", "2h", "4h"]
        .map(String::from)
        .to_vec()
}

fn default_max_queue_lifetime() -> String {
    "5d".into()
}

fn default_per_destination_concurrency() -> i32 {
    10
}

/// Per-pod limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest accepted message in bytes (advertised with SIZE); larger ones get 552.
    #[serde(default = "default_max_message_size")]
    #[schemars(range(min = 1024, max = 1073741824))]
    pub max_message_size: i64,
    /// Most recipients per message; more get 452.
    #[serde(default = "default_max_recipients")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_recipients: i32,
    /// Most concurrent SMTP connections per pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections: i32,
    /// Most concurrent SMTP connections per client IP and pod.
    #[serde(default = "default_max_connections_per_client")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections_per_client: i32,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
        }
    }
}

fn default_max_message_size() -> i64 {
    25 * 1024 * 1024
}

fn default_max_recipients() -> i32 {
    100
}

fn default_max_connections() -> i32 {
    1000
}

fn default_max_connections_per_client() -> i32 {
    50
}

/// Prometheus integration.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a prometheus-operator ServiceMonitor for the relay's `/metrics` (needs its CRD installed).
    #[serde(default)]
    pub service_monitor: bool,
}

/// Observed state of an SmtpRelay.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SmtpRelayStatus {
    /// Available, Progressing and Degraded, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Relay pods ready to accept mail.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Relay pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// In-cluster address (`host:port`) of each listener, in listener order.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Domains of the SendingDomains bound to this relay that it signs and relays for now
    /// (a domain appears once its DKIM key is active).
    #[serde(default)]
    pub bound_domains: Vec<String>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    const EXAMPLE: &str = r#"
apiVersion: petrel.dev/v1alpha1
kind: SmtpRelay
metadata:
  name: main
  namespace: mail
spec:
  replicas: 3
  redis:
    urlSecretRef: {name: redis, key: url}
  listeners:
    - {name: smtp, port: 25}
    - {name: submission, port: 587, tls: starttls, auth: required}
  tlsSecretName: relay-tls
  authUsersSecretName: relay-users
  trustedNetworks: ["10.0.0.0/8"]
  egressIps: ["203.0.113.7"]
  delivery:
    transport: smarthost
    smarthost: {host: smtp.example.net}
"#;

    #[test]
    fn example_parses_with_defaults_applied() {
        let relay: SmtpRelay = serde_yaml::from_str(EXAMPLE).expect("example parses");
        let spec = &relay.spec;
        assert_eq!(spec.effective_replicas(), 3);
        assert_eq!(spec.redis.key_prefix, "petrel");
        assert_eq!(spec.listeners[1].tls, TlsMode::Starttls);
        assert_eq!(spec.listeners[0].tls, TlsMode::None);
        assert_eq!(spec.listeners[0].effective_target_port(), 10025);
        assert_eq!(spec.listeners[1].effective_target_port(), 10587);
        let smarthost = spec.delivery.smarthost.as_ref().expect("smarthost");
        assert_eq!((smarthost.port, smarthost.tls), (587, TlsMode::Starttls));
        assert_eq!(spec.delivery.max_queue_lifetime, "5d");
        assert_eq!(spec.limits, LimitsSpec::default());
        assert!(!spec.monitoring.service_monitor);
    }

    #[test]
    fn minimal_spec_gets_default_listener() {
        let spec: SmtpRelaySpec =
            serde_yaml::from_str("redis: {urlSecretRef: {name: r, key: url}}").expect("parses");
        assert_eq!(spec.listeners, default_listeners());
        assert_eq!(spec.effective_replicas(), DEFAULT_REPLICAS);
        assert_eq!(spec.delivery, DeliverySpec::default());
    }

    #[test]
    fn autoscaling_defaults_to_hpa_and_keda_takes_prometheus() {
        let cpu: AutoscalingSpec = serde_yaml::from_str("maxReplicas: 4").expect("parses");
        assert_eq!(cpu.engine, AutoscalingEngine::Hpa);
        assert_eq!(cpu.target_due_per_pod, 100);
        let keda: AutoscalingSpec = serde_yaml::from_str(
            "{maxReplicas: 8, engine: keda, targetDuePerPod: 50, prometheus: {serverAddress: 'http://prom:9090'}}",
        )
        .expect("parses");
        assert_eq!(keda.engine, AutoscalingEngine::Keda);
        assert_eq!(keda.target_due_per_pod, 50);
        assert_eq!(
            keda.prometheus.map(|p| p.server_address).as_deref(),
            Some("http://prom:9090")
        );
        assert!(serde_yaml::from_str::<AutoscalingSpec>("{maxReplicas: 2, engine: vpa}").is_err());
    }

    #[test]
    fn round_trip() {
        let relay: SmtpRelay = serde_yaml::from_str(EXAMPLE).expect("example parses");
        let json = serde_json::to_string(&relay).expect("serializes");
        let back: SmtpRelay = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, relay);
    }

    #[test]
    fn schema_carries_cel_rules_and_defaults() {
        let crd = serde_json::to_string(&SmtpRelay::crd()).expect("serializes");
        for needle in [
            "!(has(self.replicas) && has(self.autoscaling))",
            "self.minReplicas <= self.maxReplicas",
            "self.engine != 'keda' || has(self.prometheus)",
            r#""default":"hpa""#,
            "self.all(l, self.exists_one(m, m.port == l.port))",
            "self.auth == 'none' || self.tls != 'none' || self.allowInsecureAuth",
            "self.transport != 'smarthost' || has(self.smarthost)",
            "has(self.tlsSecretName)",
            "!self.listeners.exists(l, l.name == 'feedback')",
            r#""x-kubernetes-list-type":"map""#,
            r#""default":"petrel""#,
            r#""shortNames":["smtprelay"]"#,
            r#""categories":["petrel"]"#,
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}
