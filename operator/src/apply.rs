//! Writes to the API, the same way for every controller: server-side apply
//! with the operator's one field manager and `force()`, status through the
//! status subresource, deletes that treat "already gone" as done, and
//! children whose CRD may not be installed (ServiceMonitor and the like).

use kube::Resource;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::json;

use crate::error::{Error, Result};
pub use crate::names::FIELD_MANAGER;

/// Server-side apply of a child object; returns the object as stored.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let mut value = serde_json::to_value(obj).map_err(|e| Error::Build(e.to_string()))?;
    let dt = K::DynamicType::default();
    value["apiVersion"] = json!(K::api_version(&dt));
    value["kind"] = json!(K::kind(&dt));
    Ok(api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?)
}

/// Writes `status` of the object `name` by server-side apply on the status
/// subresource, with the operator's one field manager. Callers decide first
/// whether anything a reader sees changed, so timestamps alone never patch.
pub async fn apply_status<K>(api: &Api<K>, name: &str, status: &impl serde::Serialize) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Deletes `name`; an object that is already gone counts as deleted.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Applies `desired` (or deletes the object when it is `None`) of a kind that
/// comes from an optional CRD. Returns `Ok(false)` when the API does not know
/// the kind (the CRD is not installed): the caller decides whether that is
/// worth an Event; it is never an error, the relay runs without it.
pub async fn apply_optional(
    client: &kube::Client,
    ns: &str,
    resource: &ApiResource,
    name: &str,
    desired: Option<&serde_json::Value>,
) -> Result<bool> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
    let result = match desired {
        Some(obj) => api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map(|_| ()),
        None => api.delete(name, &DeleteParams::default()).await.map(|_| ()),
    };
    match result {
        Ok(()) => Ok(true),
        // Deleting: no such object (nothing to delete) or no such kind, both fine.
        Err(kube::Error::Api(status)) if status.code == 404 && desired.is_none() => Ok(true),
        // Applying: the kind is unknown.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(err.into()),
    }
}
