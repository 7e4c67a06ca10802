//! A small Kubernetes API server for tests: it speaks the real list/watch
//! protocol over HTTP/1.1 (resourceVersions, chunked watch streams of
//! ADDED/MODIFIED/DELETED events, BOOKMARKs, `410 Expired` for a compacted
//! resourceVersion, streaming lists) with real `k8s-openapi` JSON, so the
//! agent under test runs its real kube-rs client code.
//!
//! Served: `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//! `/api/v1/nodes`, with `labelSelector` (`key`, `!key`, `key=value`) and
//! `fieldSelector` (`metadata.name=`). Every request is recorded.
//!
//! As a real API server does:
//! - a watch from resourceVersion `""` or `"0"` starts with synthetic
//!   ADDED events for every object; with `sendInitialEvents=true` (a
//!   streaming list) they end with a BOOKMARK annotated
//!   `k8s.io/initial-events-end` (`StreamingLists::Supported`, the
//!   default), or the request is refused with `422 Invalid`
//!   (`StreamingLists::Refused`, the WatchList feature gate off), or the
//!   parameter is ignored (`StreamingLists::Ignored`, a server older than
//!   1.27);
//! - a watch from a compacted resourceVersion gets `200 OK` and an in-stream
//!   ERROR event with code 410 (the apiserver never answers 410 as the
//!   status of a watch);
//! - BOOKMARKs come every `bookmark_interval` to watches that allow them.
//!
//! Faults, for the tests of the agent's recovery: `inject` arms a fault for
//! the next requests (`Fault`), `stop`/`restart` take the server down and
//! bring it back (with its history compacted, as after an etcd restore or a
//! long outage), `compact_and_disconnect` drops every watch.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::netns::{self, NetNs};

/// Collection names, for `inject`.
pub const SERVICES: &str = "services";
pub const ENDPOINTSLICES: &str = "endpointslices";
pub const NODES: &str = "nodes";

/// The annotation of the BOOKMARK that ends a streaming list's initial events.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// One change, as a watch stream reports it.
#[derive(Clone)]
struct Event {
    rv: u64,
    resource: &'static str,
    kind: &'static str,
    object: Stored,
}

/// An object, and its JSON text (serialized once, sent many times).
#[derive(Clone)]
struct Stored {
    value: Value,
    json: Arc<str>,
}

impl Stored {
    fn new(value: Value) -> Self {
        let json = value.to_string().into();
        Self { value, json }
    }
}

/// A watch event line.
fn event_line(kind: &str, object: &Stored) -> String {
    format!("{{\"type\":\"{kind}\",\"object\":{}}}", object.json)
}

/// How the server answers `sendInitialEvents=true`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamingLists {
    /// Initial events, then the `k8s.io/initial-events-end` BOOKMARK.
    Supported,
    /// `422 Invalid`, as with the WatchList feature gate off.
    Refused,
    /// The parameter is ignored (servers before 1.27): initial events, but
    /// no BOOKMARK marks their end.
    Ignored,
}

/// A fault for the next requests of a collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A watch answers with its headers, then sends nothing at all: no
    /// event, no BOOKMARK, no end (a stuck proxy or a half-dead TCP path).
    HangWatch,
    /// The next event of a watch (open or not) goes out as the first half
    /// of its chunk, then the connection closes.
    CutChunk,
    /// The next event of a watch (open or not) is preceded by a line that
    /// is not JSON.
    Garbage,
    /// A request (list or watch) is answered `500 Internal Server Error`.
    Error500,
}

impl Fault {
    /// Faults taken when a request arrives; the others are taken by the
    /// watch stream that sends the next event.
    fn at_request(self, watch: bool) -> bool {
        match self {
            Fault::Error500 => true,
            Fault::HangWatch => watch,
            Fault::CutChunk | Fault::Garbage => false,
        }
    }
}

struct Armed {
    resource: Option<&'static str>,
    fault: Fault,
    remaining: usize,
}

struct State {
    rv: u64,
    /// (resource, namespace, name) -> object.
    objects: BTreeMap<(&'static str, String, String), Stored>,
    events: Vec<Event>,
    /// Watches asking for a resourceVersion below this get 410 Expired.
    compacted_below: u64,
    /// Bumped to end every open watch stream (a dropped connection).
    epoch: u64,
    /// Bumped to stop the current listener.
    listener: u64,
    requests: Vec<String>,
    faults: Vec<Armed>,
    streaming: StreamingLists,
    bookmark_interval: Duration,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API state lock")
    }
}

/// The server; it stops with the test process (its threads only block on
/// sockets of a namespace the test deletes).
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// `/run/netns/NAME` of the namespace it listens in (for `restart`).
    netns: PathBuf,
    accept: Mutex<Option<JoinHandle<()>>>,
}

/// The API collection an object belongs to.
fn resource_of(obj: &Value) -> &'static str {
    match obj["kind"].as_str() {
        Some("Service") => SERVICES,
        Some("EndpointSlice") => ENDPOINTSLICES,
        Some("Node") => NODES,
        other => panic!("fake API server does not serve kind {other:?}"),
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
    (ns, obj["metadata"]["name"].as_str().expect("object name").to_owned())
}

/// Bind `addr` (port 0: any) on 127.0.0.1 inside the namespace at `netns`.
fn bind(netns: &Path, addr: SocketAddr) -> TcpListener {
    let path = netns.to_owned();
    thread::spawn(move || {
        netns::enter(&path);
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind fake API server on {addr}: {e}"));
        l.set_nonblocking(true).expect("nonblocking listener");
        l
    })
    .join()
    .expect("bind thread")
}

/// Accept connections until the listener generation moves on; the listener
/// (and so the port) closes when this returns.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, generation: u64) {
    loop {
        if shared.lock().listener != generation {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(shared);
                thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = serve(stream, &shared);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl FakeApi {
    /// Listen on 127.0.0.1 inside `ns` (the node's namespace, where the
    /// agent runs).
    pub fn start(ns: &NetNs) -> Self {
        let netns = PathBuf::from("/run/netns").join(&ns.name);
        let listener = bind(&netns, "127.0.0.1:0".parse().expect("addr"));
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                objects: BTreeMap::new(),
                events: Vec::new(),
                compacted_below: 0,
                epoch: 0,
                listener: 0,
                requests: Vec::new(),
                faults: Vec::new(),
                streaming: StreamingLists::Supported,
                bookmark_interval: Duration::from_millis(500),
            }),
            cv: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let accept = thread::spawn(move || accept_loop(&listener, &s, 0));
        Self { addr, shared, netns, accept: Mutex::new(Some(accept)) }
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
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let resource = resource_of(obj);
        let (ns, name) = key_of(obj);
        let mut obj = obj.clone();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{resource}-{ns}-{name}"));
        let obj = Stored::new(obj);
        let existed = st.objects.insert((resource, ns, name), obj.clone()).is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        st.events.push(Event { rv, resource, kind, object: obj });
        self.shared.cv.notify_all();
    }

    /// Delete an object (DELETED).
    pub fn delete(&self, obj: &Value) {
        let mut st = self.shared.lock();
        let resource = resource_of(obj);
        let (ns, name) = key_of(obj);
        let Some(old) = st.objects.remove(&(resource, ns, name)) else { return };
        st.rv += 1;
        let rv = st.rv;
        let mut old = old.value;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push(Event { rv, resource, kind: "DELETED", object: Stored::new(old) });
        self.shared.cv.notify_all();
    }

    /// Forget history (as etcd compaction does) and drop every watch: the
    /// clients' next watch from their last resourceVersion gets 410 Expired
    /// and must relist.
    pub fn compact_and_disconnect(&self) {
        let mut st = self.shared.lock();
        compact(&mut st);
        st.epoch += 1;
        self.shared.cv.notify_all();
    }

    /// Drop every open watch stream (the connection closes without the
    /// final chunk, as when a proxy in between restarts); history stays.
    pub fn disconnect(&self) {
        self.shared.lock().epoch += 1;
        self.shared.cv.notify_all();
    }

    /// Take the server down: the port closes (connections are refused) and
    /// every open stream is cut. Objects can still be changed meanwhile;
    /// clients see the changes after `restart`.
    pub fn stop(&self) {
        {
            let mut st = self.shared.lock();
            st.listener += 1;
            st.epoch += 1;
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.accept.lock().expect("accept lock").take() {
            t.join().expect("accept thread");
        }
    }

    /// Bring the server back on the same address; `compacted`: its history
    /// is gone, so every client's resourceVersion has expired (410) and
    /// must be relisted.
    pub fn restart(&self, compacted: bool) {
        let generation = {
            let mut st = self.shared.lock();
            if compacted {
                compact(&mut st);
            }
            st.listener
        };
        let listener = bind(&self.netns, self.addr);
        let s = Arc::clone(&self.shared);
        *self.accept.lock().expect("accept lock") = Some(thread::spawn(move || accept_loop(&listener, &s, generation)));
    }

    /// Arm `fault` for the next `times` requests it applies to (`Error500`:
    /// lists and watches; the others: watches) of collection `resource`
    /// (`SERVICES`, `ENDPOINTSLICES`, `NODES`; `None`: any).
    pub fn inject(&self, resource: Option<&'static str>, fault: Fault, times: usize) {
        self.shared.lock().faults.push(Armed { resource, fault, remaining: times });
    }

    /// Faults armed but not yet triggered.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.iter().map(|a| a.remaining).sum()
    }

    /// How `sendInitialEvents=true` is answered from now on.
    pub fn set_streaming_lists(&self, mode: StreamingLists) {
        self.shared.lock().streaming = mode;
    }

    /// How often watches that allow bookmarks get one (default 500 ms; a
    /// real API server sends one about every minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.lock().bookmark_interval = every;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Complete lists of `resource` asked for so far: classic lists and
    /// streaming lists (watches with `sendInitialEvents=true`).
    pub fn lists(&self, resource: &str) -> usize {
        let path = match resource {
            SERVICES => "/api/v1/services?",
            ENDPOINTSLICES => "/apis/discovery.k8s.io/v1/endpointslices?",
            _ => "/api/v1/nodes?",
        };
        self.requests()
            .iter()
            .filter(|r| r.contains(path) && (!r.contains("watch=true") || r.contains("sendInitialEvents=true")))
            .count()
    }

    /// Request lines received so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // End the accept loop and every stream: nothing outlives the test.
        let mut st = self.shared.lock();
        st.listener += 1;
        st.epoch += 1;
        self.shared.cv.notify_all();
    }
}

fn compact(st: &mut State) {
    st.compacted_below = st.rv + 1;
    st.rv += 1;
    st.events.clear();
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

/// The objects of `resource` the selectors in `params` select.
fn current<'a>(
    st: &'a State,
    resource: &'static str,
    params: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = &'a Stored> + 'a {
    st.objects.iter().filter(move |((r, _, _), o)| *r == resource && selected(&o.value, params)).map(|(_, o)| o)
}

fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    respond_text(stream, status, &body.to_string())
}

fn respond_text(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn chunk_bytes(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n", data.len())?;
    stream.write_all(data)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    chunk_bytes(stream, format!("{line}\n").as_bytes())
}

/// Take the first armed fault for `resource` that `wanted` accepts.
fn take_fault(st: &mut State, resource: &'static str, wanted: impl Fn(Fault) -> bool) -> Option<Fault> {
    let i = st
        .faults
        .iter()
        .position(|a| a.resource.is_none_or(|r| r == resource) && wanted(a.fault) && a.remaining > 0)?;
    let fault = st.faults[i].fault;
    st.faults[i].remaining -= 1;
    if st.faults[i].remaining == 0 {
        st.faults.remove(i);
    }
    Some(fault)
}

/// `apiVersion` and `kind` of a collection's items and of its list.
fn kinds(resource: &str) -> (&'static str, &'static str, &'static str) {
    match resource {
        SERVICES => ("v1", "Service", "ServiceList"),
        ENDPOINTSLICES => ("discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList"),
        _ => ("v1", "Node", "NodeList"),
    }
}

fn serve(mut stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
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
    let resource = match path.as_str() {
        "/api/v1/services" => SERVICES,
        "/apis/discovery.k8s.io/v1/endpointslices" => ENDPOINTSLICES,
        "/api/v1/nodes" => NODES,
        _ => {
            shared.lock().requests.push(format!("GET {target}"));
            return respond(&mut stream, "404 Not Found", &status(404, "NotFound", "not served here"));
        }
    };
    let (api_version, _, list_kind) = kinds(resource);
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let mut st = shared.lock();
    st.requests.push(format!("GET {target}"));
    let fault = take_fault(&mut st, resource, |f| f.at_request(watch));
    if fault == Some(Fault::Error500) {
        drop(st);
        return respond(&mut stream, "500 Internal Server Error", &status(500, "InternalError", "injected fault"));
    }
    if !watch {
        let items: Vec<&str> = current(&st, resource, &params).map(|o| &*o.json).collect();
        let body = format!(
            "{{\"apiVersion\":\"{api_version}\",\"kind\":\"{list_kind}\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\
             \"items\":[{}]}}",
            st.rv,
            items.join(",")
        );
        drop(st);
        return respond_text(&mut stream, "200 OK", &body);
    }

    watch_stream(stream, shared, st, resource, &params, fault)
}

/// Serve a watch request: from its resourceVersion, or with initial events.
fn watch_stream<'a>(
    mut stream: TcpStream,
    shared: &'a Arc<Shared>,
    mut st: std::sync::MutexGuard<'a, State>,
    resource: &'static str,
    params: &BTreeMap<String, String>,
    fault: Option<Fault>,
) -> std::io::Result<()> {
    let (api_version, kind, _) = kinds(resource);
    let initial_events = params.get("sendInitialEvents").is_some_and(|v| v == "true");
    let streaming = initial_events && st.streaming != StreamingLists::Ignored;
    if streaming && st.streaming == StreamingLists::Refused {
        drop(st);
        let message = "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents \
                       is forbidden for watch unless the WatchList feature gate is enabled";
        return respond(&mut stream, "422 Unprocessable Entity", &status(422, "Invalid", message));
    }
    if streaming && params.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        drop(st);
        let message = "sendInitialEvents requires resourceVersionMatch=NotOlderThan";
        return respond(&mut stream, "422 Unprocessable Entity", &status(422, "Invalid", message));
    }
    let rv_param = params.get("resourceVersion").map_or("", String::as_str);
    let from: u64 = rv_param.parse().unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    if fault == Some(Fault::HangWatch) {
        drop(st);
        return hang(&mut stream, shared);
    }
    if from != 0 && from < st.compacted_below {
        let expired = json!({"type": "ERROR", "object":
            status(410, "Expired", &format!("too old resource version: {from} ({})", st.compacted_below))});
        drop(st);
        chunk(&mut stream, &expired)?;
        return write!(stream, "0\r\n\r\n");
    }
    let epoch = st.epoch;
    // Resource versions "" and "0": synthetic ADDED events for what exists.
    let mut initial: Vec<String> = Vec::new();
    let mut sent = from;
    if from == 0 {
        initial = current(&st, resource, params).map(|o| event_line("ADDED", o)).collect();
        sent = st.rv;
        if streaming {
            let end = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": st.rv.to_string(), "annotations": {INITIAL_EVENTS_END: "true"}}}});
            initial.push(end.to_string());
        }
    }
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    loop {
        let mut pending: Vec<String> = std::mem::take(&mut initial);
        pending.extend(
            st.events
                .iter()
                .filter(|e| e.resource == resource && e.rv > sent && selected(&e.object.value, params))
                .map(|e| event_line(e.kind, &e.object)),
        );
        sent = sent.max(st.events.iter().filter(|e| e.resource == resource).map(|e| e.rv).max().unwrap_or(0));
        let now_rv = st.rv;
        let interval = st.bookmark_interval;
        let fault = if pending.is_empty() {
            None
        } else {
            take_fault(&mut st, resource, |f| matches!(f, Fault::CutChunk | Fault::Garbage))
        };
        drop(st);
        if !send_events(&mut stream, pending, fault)? {
            return Ok(()); // cut
        }
        if bookmarks && last_bookmark.elapsed() >= interval {
            let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": now_rv.to_string()}}});
            chunk(&mut stream, &bm)?;
            sent = sent.max(now_rv);
            last_bookmark = Instant::now();
        }
        st = shared.lock();
        if st.epoch != epoch {
            drop(st);
            // Dropped connection: no terminating chunk, just close.
            return stream.shutdown(Shutdown::Both);
        }
        if started.elapsed() > timeout {
            drop(st);
            return write!(stream, "0\r\n\r\n");
        }
        let wait = interval.min(Duration::from_millis(200));
        st = shared.cv.wait_timeout(st, wait).expect("fake API state lock").0;
        if st.epoch != epoch {
            // Dropped while waiting: what woke us must not go out on it.
            drop(st);
            return stream.shutdown(Shutdown::Both);
        }
    }
}

/// Send watch event lines, with the armed stream fault in front of the
/// first, in one write; returns false when the connection was cut.
fn send_events(stream: &mut TcpStream, lines: Vec<String>, fault: Option<Fault>) -> std::io::Result<bool> {
    let mut out: Vec<u8> = Vec::new();
    let mut add_chunk = |data: &[u8]| {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    };
    for (i, line) in lines.into_iter().enumerate() {
        let data = format!("{line}\n");
        if i == 0 && fault == Some(Fault::Garbage) {
            add_chunk(b"}this is not JSON{\n");
        }
        if i == 0 && fault == Some(Fault::CutChunk) {
            // Half of the event's chunk, then the connection closes.
            write!(stream, "{:x}\r\n", data.len())?;
            stream.write_all(&data.as_bytes()[..data.len() / 2])?;
            stream.flush()?;
            stream.shutdown(Shutdown::Both)?;
            return Ok(false);
        }
        add_chunk(data.as_bytes());
    }
    if !out.is_empty() {
        stream.write_all(&out)?;
        stream.flush()?;
    }
    Ok(true)
}

/// Send nothing until the client goes away or the server drops its streams.
fn hang(stream: &mut TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let epoch = shared.lock().epoch;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
        if shared.lock().epoch != epoch {
            return stream.shutdown(Shutdown::Both);
        }
    }
}
