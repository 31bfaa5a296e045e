//! Which SendingDomain owns a domain when several claim it (pure). The
//! SendingDomain controller refuses the losing claim; the SmtpRelay controller
//! leaves it out of the relay's config. Both must decide alike.

use kube::ResourceExt;
use petrel_crds::sending_domain::SendingDomain;

/// Whether `sd` loses its domain to an older SendingDomain in `all`: the oldest
/// claim (then the smaller name) wins, so the outcome never flips back and forth.
pub fn conflicting_owner<'a>(
    sd: &SendingDomain,
    all: &'a [SendingDomain],
) -> Option<&'a SendingDomain> {
    let key = |s: &SendingDomain| {
        (
            s.metadata.creation_timestamp.clone().map(|t| t.0),
            s.name_any(),
        )
    };
    all.iter()
        .filter(|other| {
            other.name_any() != sd.name_any()
                && other.namespace() == sd.namespace()
                && other.spec.domain.eq_ignore_ascii_case(&sd.spec.domain)
        })
        .filter(|other| key(other) < key(sd))
        .min_by_key(|other| key(other))
}
