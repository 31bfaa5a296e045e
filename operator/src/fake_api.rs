//! A small in-memory Kubernetes API behind kube's tower-test mock, enough for
//! the reconcilers: get, list, server-side apply (objects and status), JSON
//! merge patch, create, delete with owner-reference garbage collection, and
//! Events. Tests can inject an error for the next matching request.
//!
//! Lists honour simple label selectors (`k=v`, `k!=v`) and metadata-only
//! requests (`as=PartialObjectMetadataList`); a watch request is never
//! answered (nothing changes while it is open), so the controllers' watchers
//! run on their initial lists.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    events: Vec<Value>,
    requests: Vec<String>,
    failures: Vec<(String, String, u16)>,
    counter: u64,
}

/// The fake API server.
#[derive(Default)]
pub struct FakeApi {
    state: Mutex<State>,
    /// Notified after every request.
    changed: tokio::sync::Notify,
}

/// The path of a namespaced object of kind `K`.
pub fn path<K: kube::Resource<DynamicType = ()>>(ns: &str, name: &str) -> String {
    format!("{}/{name}", K::url_path(&(), Some(ns)))
}

impl FakeApi {
    /// A client talking to a fresh fake API server.
    pub fn start() -> (Client, Arc<FakeApi>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Arc::new(FakeApi::default());
        let server = api.clone();
        tokio::spawn(async move {
            // Open watches: kept, never answered, so the watcher waits.
            let mut watches = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let is_watch = request
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
                if is_watch {
                    server
                        .lock()
                        .requests
                        .push(format!("WATCH {}", request.uri().path()));
                    watches.push(send);
                } else {
                    let response = server.handle(request).await;
                    send.send_response(response);
                }
                server.changed.notify_waiters();
            }
        });
        (Client::new(service, "default"), api)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object as the API server would after a create.
    pub fn insert(&self, path: &str, mut obj: Value) {
        let mut state = self.lock();
        state.counter += 1;
        let n = state.counter;
        init_metadata(&mut obj, n, path);
        state.objects.insert(path.to_string(), obj);
    }

    /// The stored object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// Typed copy of the stored object at `path`.
    pub fn typed<K: serde::de::DeserializeOwned>(&self, path: &str) -> K {
        serde_json::from_value(
            self.get(path)
                .unwrap_or_else(|| panic!("{path} not stored")),
        )
        .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Overwrites part of a stored object (a test playing kubelet or a user).
    pub fn merge(&self, path: &str, patch: Value) {
        if let Some(obj) = self.lock().objects.get_mut(path) {
            merge_patch(obj, &patch);
        }
    }

    /// Paths of stored objects.
    pub fn paths(&self) -> Vec<String> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Waits until `done` holds, re-checking after every request.
    pub async fn wait_for(&self, done: impl Fn(&FakeApi) -> bool) {
        loop {
            let changed = self.changed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    /// Events posted so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Answers the next `method` request whose path contains `fragment` with `code`.
    pub fn fail_next(&self, method: &str, fragment: &str, code: u16) {
        self.lock()
            .failures
            .push((method.to_string(), fragment.to_string(), code));
    }

    /// Deletes an object and, like the garbage collector, everything it owns.
    pub fn delete(&self, path: &str) -> Option<Value> {
        let mut state = self.lock();
        let removed = state.objects.remove(path)?;
        let mut uids = vec![removed["metadata"]["uid"].clone()];
        while let Some(uid) = uids.pop() {
            let owned: Vec<String> = state
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
                })
                .map(|(p, _)| p.clone())
                .collect();
            for p in owned {
                if let Some(o) = state.objects.remove(&p) {
                    uids.push(o["metadata"]["uid"].clone());
                }
            }
        }
        Some(removed)
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let method = parts.method.as_str().to_string();
        let path = parts.uri.path().to_string();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body: Value = body
            .collect_bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let injected = {
            let mut state = self.lock();
            state.requests.push(format!("{method} {path}"));
            let hit = state
                .failures
                .iter()
                .position(|(m, f, _)| *m == method && path.contains(f.as_str()));
            hit.map(|i| state.failures.remove(i).2)
        };
        if let Some(code) = injected {
            return status_response(code, "injected failure");
        }
        let (object_path, status_sub) = match path.strip_suffix("/status") {
            Some(p) => (p.to_string(), true),
            None => (path.clone(), false),
        };
        let metadata_only = parts
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadataList"));
        let selector = parts.uri.query().and_then(label_selector);
        if method == "GET" && (metadata_only || selector.is_some()) {
            let mut state = self.lock();
            let last = state.requests.len() - 1;
            let detail = format!(
                "{}{}",
                if metadata_only { " metadata-only" } else { "" },
                selector
                    .as_deref()
                    .map(|s| format!(" labels {s}"))
                    .unwrap_or_default()
            );
            state.requests[last].push_str(&detail);
        }
        match method.as_str() {
            "GET" => self.get_or_list(&path, selector.as_deref(), metadata_only),
            "POST" if path.contains("/events") => {
                self.lock().events.push(body.clone());
                json_response(StatusCode::CREATED, &body)
            }
            "POST" => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{path}/{name}");
                if self.get(&key).is_some() {
                    return status_response(409, "already exists");
                }
                self.insert(&key, body);
                json_response(StatusCode::CREATED, &self.get(&key).unwrap_or_default())
            }
            "PATCH" if content_type.starts_with("application/apply-patch") => {
                self.apply(&object_path, body, status_sub)
            }
            "PATCH" => {
                let mut state = self.lock();
                state.counter += 1;
                let rv = state.counter;
                match state.objects.get_mut(&object_path) {
                    Some(obj) => {
                        merge_patch(obj, &body);
                        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                        json_response(StatusCode::OK, obj)
                    }
                    None => status_response(404, "not found"),
                }
            }
            "PUT" => {
                // Replace with optimistic concurrency on resourceVersion.
                let mut state = self.lock();
                state.counter += 1;
                let rv = state.counter;
                match state.objects.get_mut(&object_path) {
                    Some(existing) => {
                        let sent = body["metadata"]["resourceVersion"].clone();
                        if !sent.is_null() && sent != existing["metadata"]["resourceVersion"] {
                            return status_response(409, "the object has been modified");
                        }
                        let mut replacement = body;
                        replacement["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                        replacement["metadata"]["resourceVersion"] = json!(rv.to_string());
                        *existing = replacement;
                        json_response(StatusCode::OK, existing)
                    }
                    None => status_response(404, "not found"),
                }
            }
            "DELETE" => match self.delete(&path) {
                Some(_) => json_response(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ),
                None => status_response(404, "not found"),
            },
            _ => status_response(405, "method not allowed"),
        }
    }

    fn get_or_list(
        &self,
        path: &str,
        selector: Option<&str>,
        metadata_only: bool,
    ) -> Response<Body> {
        let state = self.lock();
        if let Some(obj) = state.objects.get(path) {
            return json_response(StatusCode::OK, obj);
        }
        if is_collection(path) {
            let prefix = format!("{path}/");
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                .filter(|(_, o)| selector.is_none_or(|s| matches_labels(o, s)))
                .map(|(_, o)| {
                    if metadata_only {
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                               "metadata": o["metadata"].clone()})
                    } else {
                        o.clone()
                    }
                })
                .collect();
            let kind = if metadata_only {
                "PartialObjectMetadataList"
            } else {
                "List"
            };
            return json_response(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        status_response(404, "not found")
    }

    fn apply(&self, path: &str, body: Value, status_sub: bool) -> Response<Body> {
        let mut state = self.lock();
        state.counter += 1;
        let n = state.counter;
        match state.objects.get_mut(path) {
            Some(existing) if status_sub => {
                existing["status"] = body["status"].clone();
                existing["metadata"]["resourceVersion"] = json!(n.to_string());
                json_response(StatusCode::OK, existing)
            }
            None if status_sub => status_response(404, "not found"),
            Some(existing) => {
                let spec_before = existing["spec"].clone();
                if let (Some(target), Some(fields)) = (existing.as_object_mut(), body.as_object()) {
                    for (k, v) in fields {
                        if k != "metadata" && k != "status" {
                            target.insert(k.clone(), v.clone());
                        }
                    }
                }
                for field in ["labels", "ownerReferences"] {
                    if !body["metadata"][field].is_null() {
                        existing["metadata"][field] = body["metadata"][field].clone();
                    }
                }
                if existing["spec"] != spec_before {
                    let generation = existing["metadata"]["generation"].as_i64().unwrap_or(1);
                    existing["metadata"]["generation"] = json!(generation + 1);
                }
                existing["metadata"]["resourceVersion"] = json!(n.to_string());
                json_response(StatusCode::OK, existing)
            }
            None => {
                let mut obj = body;
                init_metadata(&mut obj, n, path);
                state.objects.insert(path.to_string(), obj.clone());
                json_response(StatusCode::CREATED, &obj)
            }
        }
    }
}

fn init_metadata(obj: &mut Value, n: u64, path: &str) {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let meta = &mut obj["metadata"];
    if meta["uid"].is_null() {
        meta["uid"] = json!(format!("uid-{n}"));
    }
    meta["resourceVersion"] = json!(n.to_string());
    if meta["generation"].is_null() {
        meta["generation"] = json!(1);
    }
    if meta["creationTimestamp"].is_null() {
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    if let Some(i) = segments.iter().position(|s| *s == "namespaces") {
        meta["namespace"] = json!(segments.get(i + 1).copied().unwrap_or_default());
    }
    if let Some(name) = segments.last() {
        meta["name"] = json!(name);
    }
}

/// The `labelSelector` of a query string, decoded.
fn label_selector(query: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        p.strip_prefix("labelSelector=").map(|v| {
            v.replace("%3D", "=")
                .replace("%3d", "=")
                .replace("%21", "!")
                .replace("%2F", "/")
                .replace("%2f", "/")
                .replace("%2C", ",")
                .replace("%2c", ",")
        })
    })
}

/// Whether the object's labels satisfy `k=v` and `k!=v` terms (comma-separated).
fn matches_labels(obj: &Value, selector: &str) -> bool {
    selector.split(',').all(|term| {
        let label = |k: &str| obj["metadata"]["labels"][k].as_str().map(String::from);
        match term.split_once("!=") {
            Some((k, v)) => label(k).as_deref() != Some(v),
            None => match term.split_once('=') {
                Some((k, v)) => label(k).as_deref() == Some(v.trim_start_matches('=')),
                None => label(term).is_some(),
            },
        }
    })
}

fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let namespaced_at = if segments.first() == Some(&"api") {
        2
    } else {
        3
    };
    let len = if segments.get(namespaced_at) == Some(&"namespaces") {
        namespaced_at + 3
    } else {
        namespaced_at + 1
    };
    segments.len() == len
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch.as_object() {
        Some(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else {
                    merge_patch(&mut target[k], v);
                }
            }
        }
        None => *target = patch.clone(),
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::from(Vec::new())))
}

fn status_response(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}
