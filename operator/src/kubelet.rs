//! What the operator assumes about the kubelet, shared by the DkimKey rotation
//! (how long it waits before activating a key) and the SmtpRelay controller
//! (which key a relay may sign with while a new key file is being mounted).

use k8s_openapi::jiff::SignedDuration;

/// How long a key's file must have been in Secrets before the relay config may
/// switch to it, and how long a replaced key's file stays after the switch.
///
/// The kubelet refreshes a pod's ConfigMap and Secret volumes independently,
/// each within its sync period (1m by default) plus its cache delay. The
/// relays' aggregated Secret carries a key from the moment it is generated
/// (phase Pending), so waiting this long after generation before activating
/// means the file is mounted before the ConfigMap names it; keeping a retired
/// key at least this long means no pod still configured for it loses the file.
/// Without this, a requested rotation with fast DNS (or `verifyDns: false` with
/// a short `publishAhead`) switched in seconds and the relay answered 451 for
/// the domain until the Secret volume caught up. The SmtpRelay controller guards
/// the case where the relay could not reconcile between generation and switch
/// (`smtp_relay::mounted`).
pub const MOUNT_GRACE: SignedDuration = SignedDuration::from_secs(180);
