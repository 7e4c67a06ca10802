//! A small Kubernetes API server for tests: it speaks the real list/watch
//! protocol over HTTP/1.1 (resourceVersions, chunked watch streams of
//! ADDED/MODIFIED/DELETED events, BOOKMARKs, `410 Expired` for a compacted
//! resourceVersion) with real `k8s-openapi` JSON, so the agent under test
//! runs its real kube-rs watcher code.
//!
//! Served: `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//! `/api/v1/nodes`, with `labelSelector` (`key`, `!key`, `key=value`) and
//! `fieldSelector` (`metadata.name=`). Every request is recorded.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::netns::NetNs;

/// One change, as a watch stream reports it.
#[derive(Clone)]
struct Event {
    rv: u64,
    resource: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) -> object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    events: Vec<Event>,
    /// Watches asking for a resourceVersion below this get 410 Expired.
    compacted_below: u64,
    /// Bumped to end every open watch stream (a dropped connection).
    epoch: u64,
    requests: Vec<String>,
}

/// The server; it stops with the test process (its threads only block on
/// sockets of a namespace the test deletes).
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

/// The API collection an object belongs to.
fn resource_of(obj: &Value) -> &'static str {
    match obj["kind"].as_str() {
        Some("Service") => "services",
        Some("EndpointSlice") => "endpointslices",
        Some("Node") => "nodes",
        other => panic!("fake API server does not serve kind {other:?}"),
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
    (ns, obj["metadata"]["name"].as_str().expect("object name").to_owned())
}

impl FakeApi {
    /// Listen on 127.0.0.1 inside `ns` (the node's namespace, where the
    /// agent runs).
    pub fn start(ns: &NetNs) -> Self {
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("bind fake API server"));
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new((Mutex::new(State { rv: 100, ..State::default() }), Condvar::new()));
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        Self { addr, state }
    }

    /// A kubeconfig that points kube-rs at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n\
             users:\n- name: fake\n  user:\n    token: test\n",
            self.addr
        )
    }

    /// Create or replace an object (ADDED or MODIFIED).
    pub fn apply(&self, obj: &Value) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().expect("lock");
        st.rv += 1;
        let rv = st.rv;
        let resource = resource_of(obj);
        let (ns, name) = key_of(obj);
        let mut obj = obj.clone();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{resource}-{ns}-{name}"));
        let existed = st.objects.insert((resource, ns, name), obj.clone()).is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        st.events.push(Event { rv, resource, kind, object: obj });
        cv.notify_all();
    }

    /// Delete an object (DELETED).
    pub fn delete(&self, obj: &Value) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().expect("lock");
        let resource = resource_of(obj);
        let (ns, name) = key_of(obj);
        let Some(mut old) = st.objects.remove(&(resource, ns, name)) else { return };
        st.rv += 1;
        let rv = st.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push(Event { rv, resource, kind: "DELETED", object: old });
        cv.notify_all();
    }

    /// Forget history (as etcd compaction does) and drop every watch: the
    /// clients' next watch from their last resourceVersion gets 410 Expired
    /// and must relist.
    pub fn compact_and_disconnect(&self) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().expect("lock");
        st.compacted_below = st.rv + 1;
        st.rv += 1;
        st.epoch += 1;
        cv.notify_all();
    }

    /// Request lines received so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().expect("lock").requests.clone()
    }
}

/// Query string parameters, percent-decoded.
fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    (path.to_owned(), params)
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Does `obj` satisfy the label and field selectors?
fn selected(obj: &Value, params: &BTreeMap<String, String>) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label_ok = params.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|r| !r.is_empty()).all(|req| {
            if let Some(key) = req.strip_prefix('!') {
                labels.get(key).is_none()
            } else if let Some((k, v)) = req.split_once('=') {
                labels.get(k).and_then(Value::as_str) == Some(v)
            } else {
                labels.get(req).is_some()
            }
        })
    });
    let field_ok = params.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').filter(|r| !r.is_empty()).all(|req| match req.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
            _ => true,
        })
    });
    label_ok && field_ok
}

fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(stream, "{:x}\r\n{data}\r\n", data.len())?;
    stream.flush()
}

fn serve(mut stream: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, params) = query(&target);
    let (lock, cv) = &**shared;
    lock.lock().expect("lock").requests.push(format!("GET {target}"));
    let resource = match path.as_str() {
        "/api/v1/services" => "services",
        "/apis/discovery.k8s.io/v1/endpointslices" => "endpointslices",
        "/api/v1/nodes" => "nodes",
        _ => {
            let status =
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            return respond(&mut stream, "404 Not Found", &status);
        }
    };
    let list_kind = match resource {
        "services" => ("v1", "ServiceList"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSliceList"),
        _ => ("v1", "NodeList"),
    };
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let st = lock.lock().expect("lock");
        let items: Vec<&Value> =
            st.objects.iter().filter(|((r, _, _), o)| *r == resource && selected(o, &params)).map(|(_, o)| o).collect();
        let body = json!({
            "apiVersion": list_kind.0,
            "kind": list_kind.1,
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        drop(st);
        return respond(&mut stream, "200 OK", &body);
    }

    let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut st = lock.lock().expect("lock");
    if from != 0 && from < st.compacted_below {
        let expired = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.compacted_below),
            "reason": "Expired", "code": 410,
        }});
        drop(st);
        chunk(&mut stream, &expired)?;
        return write!(stream, "0\r\n\r\n");
    }
    let epoch = st.epoch;
    let mut sent = from;
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    loop {
        let pending: Vec<Event> = st
            .events
            .iter()
            .filter(|e| e.resource == resource && e.rv > sent && selected(&e.object, &params))
            .cloned()
            .collect();
        let now_rv = st.rv;
        drop(st);
        for e in pending {
            sent = e.rv;
            chunk(&mut stream, &json!({"type": e.kind, "object": e.object}))?;
        }
        if bookmarks && last_bookmark.elapsed() > Duration::from_millis(500) {
            let kind = &list_kind.1[..list_kind.1.len() - 4];
            let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": list_kind.0,
                "metadata": {"resourceVersion": now_rv.to_string()}}});
            chunk(&mut stream, &bm)?;
            sent = sent.max(now_rv);
            last_bookmark = Instant::now();
        }
        st = lock.lock().expect("lock");
        if st.epoch != epoch || started.elapsed() > timeout {
            drop(st);
            return write!(stream, "0\r\n\r\n");
        }
        st = cv.wait_timeout(st, Duration::from_millis(200)).expect("lock").0;
        if st.epoch != epoch {
            drop(st);
            // Dropped connection: no terminating chunk, just close.
            return Ok(());
        }
    }
}
