//! The manifest-directory source: YAML or JSON files (`*.yaml`, `*.yml`,
//! `*.json`), several documents per file, `List` objects included.
//!
//! Rules, each with a test below:
//! - **A file is taken whole or not at all.** A file that cannot be read
//!   (permission, symlink loop, a directory, too large) or parsed (bad YAML,
//!   a document that is not a readable object) keeps the objects it
//!   contributed last time, and the problem is reported once by file name.
//!   Only a successfully parsed file changes what it contributed.
//! - **Writers should rename into place** (write `x.yaml.tmp`, then rename
//!   it to `x.yaml`). A file rewritten in place is read when the writer
//!   closes it (inotify `IN_CLOSE_WRITE`), never in the middle.
//! - **One definition per object.** When two files define the same object
//!   (kind, namespace, name), the definition already held stays; the other
//!   is reported naming both files and takes over only when the holder's
//!   file stops defining it.
//! - **Only changed files are read.** inotify names them; without inotify
//!   (or after it overflowed) the directory is polled and a file is read
//!   once its size and time stayed the same for two polls.
//! - **Bounded parsing.** Files over `MAX_FILE_BYTES`, or nested deeper than
//!   `MAX_DEPTH`, are refused before they can cost much.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{BufRead, Read},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::Watcher as _;
use serde::{
    Deserialize, Deserializer,
    de::{
        self, DeserializeSeed, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess, Visitor,
        value::MapAccessDeserializer,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{Event, Object, ObjectKey, ObjectKind, Sender, slim};

/// Largest manifest file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Deepest nesting of YAML collections accepted (Kubernetes objects need
/// about a dozen levels).
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `File` and `Document` name their file; `reason` says the rest (a
    // problem report is keyed by the file already).
    #[error("manifest directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("manifest directory {path} is not a directory")]
    NotADir { path: PathBuf },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path} document {doc}: {reason}")]
    Document { path: PathBuf, doc: usize, reason: String },
}

impl Error {
    /// What went wrong, without the file name.
    fn reason(&self) -> String {
        match self {
            Error::File { reason, .. } => reason.clone(),
            Error::Document { doc, reason, .. } => format!("document {doc}: {reason}"),
            other => other.to_string(),
        }
    }
}

/// How to read the directory.
#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    /// This node's name: the Node object of that name, if a file holds one,
    /// is the node's context (topology, node addresses).
    pub node_name: Option<String>,
    /// How often to poll when inotify is not available (and to look at
    /// symlinked files, whose targets inotify does not watch).
    pub poll_interval: Duration,
}

/// Fail early when the directory cannot be used at all.
pub fn preflight(opts: &Options) -> Result<(), Error> {
    let meta = fs::metadata(&opts.dir).map_err(|source| Error::Dir { path: opts.dir.clone(), source })?;
    if !meta.is_dir() {
        return Err(Error::NotADir { path: opts.dir.clone() });
    }
    Ok(())
}

fn is_manifest(p: &Path) -> bool {
    let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime_ns: i128,
    ino: u64,
    ctime_ns: i128,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = fs::metadata(path).ok()?;
    Some(Fingerprint {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// Parse one file's text: every document must be a readable object (or
/// empty, or a kind this agent does not read); otherwise the whole file
/// fails with the first problem.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, Error> {
    parse(path, || Ok(std::io::Cursor::new(text.as_bytes())))
}

/// `parse_file` over a reader `open` gives, one document at a time: a file
/// costs the objects it holds, not its text and every document's tree at
/// once. The typed pass (`typed`) reads the common shapes straight into
/// objects; whatever it does not take whole (an error, directives, a
/// document whose `apiVersion` and `kind` do not come first) is read again
/// through `serde_json::Value` (`parse_values`), which gives the
/// problem's exact position and words.
fn parse<R: BufRead>(path: &Path, open: impl Fn() -> std::io::Result<R>) -> Result<Vec<Object>, Error> {
    let err = |e: std::io::Error| Error::File { path: path.to_owned(), reason: e.to_string() };
    if let Some(objects) = typed(&mut open().map_err(err)?) {
        return Ok(objects);
    }
    parse_values(path, &mut open().map_err(err)?)
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_documents = 1 << 20;
    budget.max_nodes = 1 << 26;
    budget.max_events = 1 << 27;
    budget.max_reader_input_bytes = usize::try_from(MAX_FILE_BYTES).ok();
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// The typed pass: documents split at their `---` lines (YAML forbids a
/// line starting with `---` or `...` inside any scalar, so these lines are
/// document markers wherever they are), each read straight into objects:
/// JSON documents by serde_json (several times faster than a YAML parser
/// on the same text), the others by serde-saphyr. `None`: read the file
/// with `parse_values`.
fn typed(reader: &mut impl BufRead) -> Option<Vec<Object>> {
    let mut out = Vec::new();
    let (mut doc, mut line) = (String::new(), String::new());
    let mut docs = 0usize;
    loop {
        line.clear();
        let eof = reader.read_line(&mut line).ok()? == 0;
        let marker =
            line.strip_prefix("---").filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if line.starts_with('%') || (line.starts_with("...") && !line.starts_with("....")) {
            return None; // directives and document ends: the YAML parser's job
        }
        if eof || marker.is_some() {
            docs += 1;
            if docs > 1 << 20 || !typed_document(&doc, &mut out) {
                return None;
            }
            doc.clear();
            doc.push_str(marker.unwrap_or_default());
            if eof {
                return Some(out);
            }
        } else {
            doc.push_str(&line);
        }
    }
}

/// One document of the typed pass; false: not taken.
fn typed_document(doc: &str, out: &mut Vec<Object>) -> bool {
    let body = doc.lines().map(str::trim_start).find(|l| !l.is_empty() && !l.starts_with('#'));
    let Some(body) = body else { return true }; // an empty document
    if body.starts_with('{') && json_depth(doc) <= MAX_DEPTH {
        let before = out.len();
        if json_document(doc, out).is_ok() {
            return true;
        }
        out.truncate(before); // not JSON after all: YAML's flow style
    }
    match serde_saphyr::from_str_with_options::<Document>(doc, options()) {
        Ok(Document(objects)) => {
            out.extend(objects);
            true
        }
        Err(_) => false,
    }
}

/// The top-level `apiVersion` and `kind` of a document, the rest skipped.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// A JSON document: its `apiVersion` and `kind` first (a quick pass that
/// skips everything else), then the object they name, read in one go
/// wherever they stand in the text.
fn json_document(doc: &str, out: &mut Vec<Object>) -> serde_json::Result<()> {
    let Head { api_version: Some(api_version), kind: Some(kind) } = serde_json::from_str(doc)? else {
        return Err(de::Error::custom("no apiVersion or kind"));
    };
    let mut de = serde_json::Deserializer::from_str(doc);
    match TypedKind::of(&api_version, &kind) {
        Some(typed) => out.push(typed.read(&mut de)?),
        None => Objects(out).deserialize(&mut de)?, // a List, or not ours
    }
    de.end()
}

/// The kinds read into objects.
#[derive(Clone, Copy)]
enum TypedKind {
    Service,
    Slice,
    Node,
}

impl TypedKind {
    fn of(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Service") => Some(TypedKind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(TypedKind::Slice),
            ("v1", "Node") => Some(TypedKind::Node),
            _ => None,
        }
    }

    /// Read the whole object (its `apiVersion` and `kind` included, which
    /// `k8s-openapi` checks) and keep what `slim` keeps.
    fn read<'de, D: Deserializer<'de>>(self, d: D) -> Result<Object, D::Error> {
        Ok(match self {
            TypedKind::Service => {
                let mut svc = Service::deserialize(d)?;
                slim::service(&mut svc);
                Object::Service(Arc::new(svc))
            }
            TypedKind::Slice => Object::slice(EndpointSlice::deserialize(d)?),
            TypedKind::Node => {
                let mut node = Node::deserialize(d)?;
                slim::node(&mut node);
                Object::Node(Arc::new(node))
            }
        })
    }
}

/// The deepest nesting of `[` and `{` in a JSON text (strings skipped).
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The objects of one YAML document (the typed pass's `Objects`, as a
/// type serde-saphyr can read).
struct Document(Vec<Object>);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        Objects(&mut out).deserialize(d)?;
        Ok(Document(out))
    }
}

/// Reads one document or `List` item into the objects it holds, typed,
/// without a tree of the whole: the entries before `apiVersion` and `kind`
/// (none, as `kubectl` and most writers order them) are kept aside, then
/// the object they name is read from them and the rest of the map. Other
/// kinds are skipped unread.
struct Objects<'a>(&'a mut Vec<Object>);

impl<'de> DeserializeSeed<'de> for Objects<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Objects<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut aside: Vec<(String, serde_json::Value)> = Vec::new();
        let (mut api_version, mut kind) = (None, None);
        while api_version.is_none() || kind.is_none() {
            let Some(key) = map.next_key::<String>()? else {
                return Err(de::Error::custom("no apiVersion or kind"));
            };
            let value: serde_json::Value = map.next_value()?;
            match (key.as_str(), value.as_str()) {
                ("apiVersion", Some(v)) => api_version = Some(v.to_owned()),
                ("kind", Some(v)) => kind = Some(v.to_owned()),
                _ => {}
            }
            aside.push((key, value));
        }
        let (api_version, kind) = (api_version.unwrap_or_default(), kind.unwrap_or_default());
        if let Some(typed) = TypedKind::of(&api_version, &kind) {
            let map = Prefixed { aside: aside.into_iter(), value: None, rest: map };
            self.0.push(typed.read(MapAccessDeserializer::new(map))?);
        } else if kind == "List" || kind.ends_with("List") {
            let items = aside.into_iter().find(|(k, _)| k == "items").map(|(_, v)| v);
            if let Some(items) = items {
                Items(self.0).deserialize(items).map_err(de::Error::custom)?;
            }
            while let Some(key) = map.next_key::<String>()? {
                if key == "items" {
                    map.next_value_seed(Items(self.0))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        } else {
            // Other kinds (Deployments, ConfigMaps, ...) are not ours.
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        }
        Ok(())
    }
}

/// The `items` of a `List`.
struct Items<'a>(&'a mut Vec<Object>);

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq.next_element_seed(Objects(self.0))?.is_some() {}
        Ok(())
    }
}

/// A map whose first entries were read already (`aside`): hands them out
/// again, then the rest of `rest`.
struct Prefixed<A> {
    aside: std::vec::IntoIter<(String, serde_json::Value)>,
    value: Option<serde_json::Value>,
    rest: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Prefixed<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        if let Some((key, value)) = self.aside.next() {
            self.value = Some(value);
            return seed.deserialize(IntoDeserializer::<A::Error>::into_deserializer(key)).map(Some);
        }
        self.rest.next_key_seed(seed)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.value.take() {
            Some(value) => seed.deserialize(value).map_err(de::Error::custom),
            None => self.rest.next_value_seed(seed),
        }
    }
}

/// The exact pass: every document through `serde_json::Value`, problems
/// named by document and object.
fn parse_values(path: &Path, reader: &mut impl Read) -> Result<Vec<Object>, Error> {
    let mut out = Vec::new();
    // Empty documents are skipped by the reader; `doc` counts the others.
    for (doc, value) in serde_saphyr::read_with_options::<_, serde_json::Value>(reader, options()).enumerate() {
        let value = value.map_err(|e| Error::File { path: path.to_owned(), reason: format!("not valid YAML: {e}") })?;
        if value.is_null() {
            continue;
        }
        add_object(value, &mut out).map_err(|reason| Error::Document { path: path.to_owned(), doc, reason })?;
    }
    Ok(out)
}

fn add_object(json: serde_json::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let api_version = json.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = json.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let name = json.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("<unnamed>").to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let mut svc = serde_json::from_value(json).map_err(|e| format!("Service {name}: {e}"))?;
            slim::service(&mut svc);
            out.push(Object::Service(Arc::new(svc)));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice = serde_json::from_value(json).map_err(|e| format!("EndpointSlice {name}: {e}"))?;
            out.push(Object::slice(slice));
        }
        ("v1", "Node") => {
            let mut node = serde_json::from_value(json).map_err(|e| format!("Node {name}: {e}"))?;
            slim::node(&mut node);
            out.push(Object::Node(Arc::new(node)));
        }
        (_, kind) if kind == "List" || kind.ends_with("List") => {
            let items = json.get("items").and_then(|v| v.as_array()).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_object(item, out).map_err(|e| format!("items[{i}]: {e}"))?;
            }
        }
        ("", _) | (_, "") => return Err("not a Kubernetes object (no apiVersion or kind)".into()),
        // Other kinds (Deployments, ConfigMaps, ...) are not ours.
        _ => log::debug!("ignoring {api_version} {kind} {name}"),
    }
    Ok(())
}

/// What one file contributes.
#[derive(Default)]
struct FileState {
    /// The version last looked at (`None`: not read yet).
    seen: Option<Fingerprint>,
    /// A version seen by a poll but not read yet (debounce).
    pending: Option<Fingerprint>,
    /// The objects of the last successful parse, by key.
    objects: BTreeMap<ObjectKey, Object>,
}

/// The directory's state: which file contributes what, and which file
/// holds each object. Pure apart from reading files; `Watch` drives it.
pub struct Dir {
    path: PathBuf,
    node_name: Option<String>,
    files: BTreeMap<PathBuf, FileState>,
    /// Object -> the file whose definition is in effect.
    /// (One `Arc` per file, shared by its objects.)
    holder: HashMap<ObjectKey, Arc<Path>>,
    /// Problems reported so far, by what they are about.
    problems: BTreeMap<String, String>,
    /// Files read so far (a figure for tests and logs).
    reads: u64,
}

/// How a scan decides which files to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// Read every file whose fingerprint changed (start, inotify events).
    Changed,
    /// Read a changed file only once two polls saw the same fingerprint.
    Debounced,
}

impl Dir {
    pub fn new(opts: &Options) -> Self {
        Self {
            path: opts.dir.clone(),
            node_name: opts.node_name.clone(),
            files: BTreeMap::new(),
            holder: HashMap::new(),
            problems: BTreeMap::new(),
            reads: 0,
        }
    }

    /// The first complete state: `Replace` per kind, problems, `Synced`.
    pub fn initial(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.scan(None, ScanMode::Changed, &mut events);
        // Everything so far is an Apply: fold them into one Replace per kind.
        let mut by_kind: BTreeMap<ObjectKind, Vec<Object>> = ObjectKind::ALL.iter().map(|k| (*k, vec![])).collect();
        let mut rest = Vec::new();
        for e in events {
            match e {
                Event::Apply(o) => by_kind.entry(o.kind()).or_default().push(o),
                other => rest.push(other),
            }
        }
        let mut out: Vec<Event> = by_kind.into_iter().map(|(k, objs)| Event::Replace(k, objs)).collect();
        out.extend(rest);
        out.push(Event::Synced);
        out
    }

    /// Look at `only` (or every manifest file) and append the changes.
    pub fn scan(&mut self, only: Option<&BTreeSet<PathBuf>>, mode: ScanMode, events: &mut Vec<Event>) {
        let mut problems = self.problems.clone();
        let listed = match self.list() {
            Ok(files) => {
                problems.remove(&self.dir_label());
                files
            }
            Err(e) => {
                // An unreadable directory is not an empty one: keep everything.
                problems.insert(self.dir_label(), e.to_string());
                self.report(problems, events);
                return;
            }
        };
        let mut paths: BTreeSet<PathBuf> = match only {
            Some(only) => only.iter().filter(|p| is_manifest(p)).cloned().collect(),
            None => listed.iter().cloned().chain(self.files.keys().cloned()).collect(),
        };
        paths.retain(|p| p.parent() == Some(self.path.as_path()));
        for path in paths {
            if !listed.contains(&path) {
                if self.files.contains_key(&path) {
                    self.set_file(&path, BTreeMap::new(), events);
                    self.files.remove(&path);
                }
                problems.retain(|what, _| !about(what, &path));
                continue;
            }
            let fp = fingerprint(&path);
            let state = self.files.entry(path.clone()).or_default();
            // Unchanged since last read, good or bad: a broken file is not
            // parsed again until it changes (a chmod changes its ctime). A
            // file that cannot even be looked at (`None`) is always tried.
            if fp.is_some() && fp == state.seen {
                continue;
            }
            if mode == ScanMode::Debounced && fp.is_some() && state.pending != fp {
                state.pending = fp;
                continue;
            }
            state.pending = None;
            state.seen = fp;
            self.reads += 1;
            match read(&path) {
                Ok(objects) => {
                    problems.remove(&label(&path));
                    let objects = objects.into_iter().filter(|o| self.wanted(o)).map(|o| (o.key(), o)).collect();
                    self.set_file(&path, objects, events);
                }
                Err(e) => {
                    // Keep what the file contributed last time; say so once.
                    let kept = self.files.get(&path).map_or(0, |s| s.objects.len());
                    problems.insert(label(&path), format!("{}; keeping its last good objects ({kept})", e.reason()));
                }
            }
        }
        self.duplicates(&mut problems);
        self.report(problems, events);
    }

    fn dir_label(&self) -> String {
        format!("manifest directory {}", self.path.display())
    }

    fn list(&self) -> Result<BTreeSet<PathBuf>, Error> {
        let err = |source| Error::Dir { path: self.path.clone(), source };
        let mut out = BTreeSet::new();
        for entry in fs::read_dir(&self.path).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if is_manifest(&path) {
                out.insert(path);
            }
        }
        Ok(out)
    }

    /// Only this node's Node object is read; every Service and slice is.
    fn wanted(&self, o: &Object) -> bool {
        match o {
            Object::Node(n) => self.node_name.is_some() && n.metadata.name == self.node_name,
            _ => true,
        }
    }

    /// Make `objects` what `path` contributes, appending the changes in effect.
    fn set_file(&mut self, path: &Path, objects: BTreeMap<ObjectKey, Object>, events: &mut Vec<Event>) {
        let old = std::mem::take(&mut self.files.entry(path.to_owned()).or_default().objects);
        for key in old.keys().filter(|k| !objects.contains_key(*k)) {
            if self.holder.get(key).map(AsRef::as_ref) != Some(path) {
                continue;
            }
            // The holder let go: the next file defining it takes over.
            let next = self.files.iter().find(|(p, s)| p.as_path() != path && s.objects.contains_key(key));
            if let Some((p, s)) = next {
                events.push(Event::Apply(s.objects[key].clone()));
                self.holder.insert(key.clone(), Arc::from(p.as_path()));
            } else {
                events.push(Event::Delete(key.clone()));
                self.holder.remove(key);
            }
        }
        let shared: Arc<Path> = Arc::from(path);
        for (key, obj) in &objects {
            match self.holder.get(key) {
                None => {
                    self.holder.insert(key.clone(), Arc::clone(&shared));
                    events.push(Event::Apply(obj.clone()));
                }
                Some(p) if p.as_ref() == path => {
                    if old.get(key) != Some(obj) {
                        events.push(Event::Apply(obj.clone()));
                    }
                }
                Some(_) => {} // a duplicate: reported by `duplicates`
            }
        }
        self.files.get_mut(path).expect("entry made above").objects = objects;
    }

    /// Report every object defined by a file other than its holder.
    fn duplicates(&self, problems: &mut BTreeMap<String, String>) {
        problems.retain(|what, _| !what.contains(": duplicate "));
        for (path, state) in &self.files {
            for key in state.objects.keys() {
                if let Some(holder) = self.holder.get(key).filter(|h| h.as_ref() != path.as_path()) {
                    problems.insert(
                        format!("{}: duplicate {key}", label(path)),
                        format!("defined more than once; the definition in {} stays", holder.display()),
                    );
                }
            }
        }
    }

    /// Emit the difference between the problems reported and `now`.
    fn report(&mut self, now: BTreeMap<String, String>, events: &mut Vec<Event>) {
        for (what, reason) in &now {
            if self.problems.get(what) != Some(reason) {
                events.push(Event::Problem { what: what.clone(), reason: Some(reason.clone()) });
            }
        }
        for what in self.problems.keys().filter(|w| !now.contains_key(*w)) {
            events.push(Event::Problem { what: what.clone(), reason: None });
        }
        self.problems = now;
    }
}

fn label(path: &Path) -> String {
    path.display().to_string()
}

/// Is the problem `what` about file `path` (its own, or a duplicate in it)?
fn about(what: &str, path: &Path) -> bool {
    let label = label(path);
    what.strip_prefix(&label).is_some_and(|rest| rest.is_empty() || rest.starts_with(": "))
}

/// Read and parse one file, refusing what is too large before reading it.
fn read(path: &Path) -> Result<Vec<Object>, Error> {
    let err = |reason: String| Error::File { path: path.to_owned(), reason };
    let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!("{} bytes, more than the {MAX_FILE_BYTES} a manifest may have", meta.len())));
    }
    parse(path, || fs::File::open(path).map(std::io::BufReader::new))
}

/// The running source: a task that turns file changes into events.
pub struct Watch {
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Read the directory, send its complete state, then follow it.
    pub fn start(opts: &Options, tx: Sender) -> Result<Self, Error> {
        preflight(opts)?;
        let mut dir = Dir::new(opts);
        for e in dir.initial() {
            let _ = tx.send(e);
        }
        let (ntx, mut nrx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        let watcher = notify::recommended_watcher(move |ev| {
            // The receiver is gone only when the source is dropped.
            let _ = ntx.send(ev);
        })
        .and_then(|mut w| w.watch(&opts.dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        let inotify = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("manifest directory {}: no inotify ({e}); polling instead", opts.dir.display());
                None
            }
        };
        let poll = opts.poll_interval;
        let dir_path = opts.dir.clone();
        let task = tokio::spawn(async move {
            let mut polling = inotify.is_none();
            // Keep the watcher alive as long as the task.
            let _inotify = inotify;
            let mut tick = tokio::time::interval(poll);
            loop {
                let mut events = Vec::new();
                tokio::select! {
                    Some(ev) = nrx.recv() => {
                        let mut paths = BTreeSet::new();
                        let mut rescan = false;
                        for ev in std::iter::once(ev).chain(std::iter::from_fn(|| nrx.try_recv().ok())) {
                            match ev {
                                Ok(ev) if ev.need_rescan() => rescan = true,
                                Ok(ev) if !polling && lost_watch(&ev, &dir_path) => {
                                    // The directory itself was removed or
                                    // moved: its inotify watch is gone.
                                    log::warn!(
                                        "manifest directory {}: removed or moved; polling it from now on",
                                        dir_path.display()
                                    );
                                    polling = true;
                                    rescan = true;
                                }
                                Ok(ev) => paths.extend(settled(ev)),
                                Err(e) => {
                                    log::warn!("manifest directory: inotify: {e}; rescanning");
                                    rescan = true;
                                }
                            }
                        }
                        if rescan {
                            dir.scan(None, ScanMode::Debounced, &mut events);
                        } else if !paths.is_empty() {
                            dir.scan(Some(&paths), ScanMode::Changed, &mut events);
                        }
                    }
                    _ = tick.tick() => {
                        // A debounced scan (polling, or after inotify lost
                        // events) reads a changed file on a later tick.
                        if polling || dir.has_pending() {
                            dir.scan(None, ScanMode::Debounced, &mut events);
                        } else {
                            // inotify does not see changes behind symlinks.
                            let links = dir.symlinks();
                            if !links.is_empty() {
                                dir.scan(Some(&links), ScanMode::Debounced, &mut events);
                            }
                        }
                    }
                }
                for e in events {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self { task })
    }
}

impl Dir {
    /// How many times a file was read.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Is a changed file waiting for a second look (debounce)?
    pub fn has_pending(&self) -> bool {
        self.files.values().any(|s| s.pending.is_some())
    }

    /// Manifest files that are symlinks.
    fn symlinks(&self) -> BTreeSet<PathBuf> {
        self.files.keys().filter(|p| p.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink())).cloned().collect()
    }
}

/// Does `ev` say the watched directory itself went away?
fn lost_watch(ev: &notify::Event, dir: &Path) -> bool {
    use notify::event::{EventKind, ModifyKind};
    matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)))
        && ev.paths.iter().any(|p| p == dir)
}

/// The paths of an inotify event whose content is complete or gone: a
/// write that ended (close), a rename into place, a removal, a permission
/// change, or a new symlink (which has no close). Plain modifications and
/// new regular files are left alone: a file is read when its writer
/// closes it, never in the middle.
fn settled(ev: notify::Event) -> Vec<PathBuf> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_)) => ev.paths,
        EventKind::Create(_) => {
            ev.paths.into_iter().filter(|p| p.symlink_metadata().is_ok_and(|m| !m.file_type().is_file())).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.2.2]}]\nports: [{port: 8080}]\n";

    #[test]
    fn reads_multi_document_files_and_lists() {
        let text = format!(
            "{SVC}---\n{SLICE}---\n# empty\n---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Service, metadata: {{name: other}}, spec: {{clusterIP: 198.19.0.11}}}}\n"
        );
        let objs = parse_file(Path::new("x.yaml"), &text).expect("parses");
        assert_eq!(objs.iter().filter(|o| o.kind() == ObjectKind::Service).count(), 2);
        assert_eq!(objs.iter().filter(|o| o.kind() == ObjectKind::EndpointSlice).count(), 1);
    }

    /// `SVC` and `SLICE` as JSON.
    const SVC_JSON: &str = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"}, "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]}}"#;
    const SLICE_JSON: &str = r#"{"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["198.18.2.2"]}], "ports": [{"port": 8080}]}"#;

    #[test]
    fn json_and_yaml_documents_in_any_key_order_read_the_same_objects() {
        let yaml = format!("{SVC}---\n{SLICE}");
        let json = format!("{SVC_JSON}\n---\n# a comment\n{SLICE_JSON}\n");
        let list =
            format!(r#"{{"apiVersion": "v1", "kind": "List", "metadata": {{}}, "items": [{SVC_JSON}, {SLICE_JSON}]}}"#);
        // apiVersion and kind last, in JSON and in YAML.
        let late_json = SVC_JSON.replace(r#""apiVersion": "v1", "kind": "Service", "#, "").replace(
            r#""ports": [{"port": 80}]}"#,
            r#""ports": [{"port": 80}]}, "apiVersion": "v1", "kind": "Service""#,
        );
        let late_json = format!("{late_json}\n---\n{SLICE_JSON}");
        let late_yaml = format!(
            "{}---\n{SLICE}",
            SVC.replace("apiVersion: v1\nkind: Service\n", "") + "kind: Service\napiVersion: v1\n"
        );
        // Directives are left to the YAML parser whole.
        let directive = format!("%YAML 1.2\n---\n{SVC}---\n{SLICE}");
        let want = parse_values(Path::new("x"), &mut yaml.as_bytes()).expect("exact pass");
        assert_eq!(want.len(), 2);
        for (what, text, typed_pass) in [
            ("yaml", &yaml, true),
            ("json", &json, true),
            ("list", &list, true),
            ("late json", &late_json, true),
            ("late yaml", &late_yaml, true),
            ("directive", &directive, false),
        ] {
            assert_eq!(typed(&mut text.as_bytes()).is_some(), typed_pass, "{what}: taken by the typed pass");
            assert_eq!(parse_file(Path::new("x"), text).expect(what), want, "{what}");
        }
    }

    #[test]
    fn a_json_document_too_deep_for_the_budget_is_refused() {
        let deep = format!(
            r#"{{"apiVersion": "v1", "kind": "Service", "spec": {}{}}}"#,
            r#"{"a": "#.repeat(40),
            "}".repeat(40)
        );
        assert!(typed(&mut deep.as_bytes()).is_none(), "the typed pass leaves it to the exact pass");
        let e = parse_file(Path::new("deep.json"), &deep).expect_err("too deep").to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn a_bad_document_fails_the_file_naming_file_and_document() {
        let text = format!(
            "{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{ports: 7}}\n---\n{SLICE}---\nkind: Deployment\napiVersion: apps/v1\n"
        );
        let e = parse_file(Path::new("x.yaml"), &text).expect_err("a bad document").to_string();
        assert!(e.contains("x.yaml document 1") && e.contains("Service bad"), "{e}");
        let e = parse_file(Path::new("y.yaml"), "foo: bar\n").expect_err("not an object").to_string();
        assert!(e.contains("not a Kubernetes object"), "{e}");
    }

    #[test]
    fn invalid_yaml_is_an_error_not_an_empty_file() {
        let e = parse_file(Path::new("x.yaml"), "apiVersion: v1\nkind: [unclosed\n").expect_err("bad YAML");
        assert!(e.to_string().contains("not valid YAML"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let e = parse_file(Path::new("deep.yaml"), &deep).expect_err("too deep");
        assert!(e.to_string().contains("not valid YAML"), "{e}");
        // Not a timed test of speed: a guard against the quadratic blow-up
        // (seconds) this replaced; the bound is two orders above the cost.
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // The budget's depth, not the parser's own limit, decides.
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let e = parse_file(Path::new("a.yaml"), &nest(MAX_DEPTH + 8)).expect_err("too deep").to_string();
        assert!(e.contains("not valid YAML"), "{e}");
        let e = parse_file(Path::new("b.yaml"), &nest(MAX_DEPTH - 8)).expect_err("not an object").to_string();
        assert!(e.contains("not a Kubernetes object"), "{e}");
    }

    struct TmpDir(PathBuf);
    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tmp() -> (TmpDir, Dir) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("dsproxy-manifests-unit-{}-{n}", std::process::id()));
        fs::create_dir_all(&p).expect("mkdir");
        let opts = Options { dir: p.clone(), node_name: None, poll_interval: Duration::from_millis(10) };
        (TmpDir(p), Dir::new(&opts))
    }

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn summary(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Apply(o) => format!("apply {}", o.key()),
                Event::Delete(k) => format!("delete {k}"),
                Event::Replace(k, objs) => format!("replace {} {}", k.name(), objs.len()),
                Event::Problem { what, reason: Some(r) } => format!("problem {what}: {r}"),
                Event::Problem { what, reason: None } => format!("resolved {what}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn scan(d: &mut Dir) -> Vec<String> {
        let mut ev = Vec::new();
        d.scan(None, ScanMode::Changed, &mut ev);
        summary(&ev)
    }

    #[test]
    fn an_unreadable_or_broken_file_keeps_its_last_good_objects() {
        let (t, mut d) = tmp();
        let f = t.0.join("a.yaml");
        fs::write(&f, svc("good", "198.19.0.10")).expect("write");
        assert_eq!(summary(&d.initial())[0], "replace Service 1");
        // Half written (in place): the YAML breaks off mid-document.
        fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: good, namesp").expect("write");
        let s = scan(&mut d);
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].starts_with(&format!("problem {}", f.display())) && s[0].contains("keeping"), "{s:?}");
        assert!(scan(&mut d).is_empty(), "reported once, not on every scan");
        // A directory and a symlink loop in its place: still kept.
        fs::remove_file(&f).expect("rm");
        std::os::unix::fs::symlink(&f, &f).expect("symlink loop");
        let s = scan(&mut d);
        assert!(s.iter().all(|l| l.starts_with("problem")), "the object is kept: {s:?}");
        fs::remove_file(&f).expect("rm");
        fs::create_dir(&f).expect("a directory named a.yaml");
        let s = scan(&mut d);
        assert!(s.iter().all(|l| l.starts_with("problem") && l.contains("not a regular file")), "{s:?}");
        fs::remove_dir(&f).expect("rmdir");
        // Fixed: the new content applies and the problem clears.
        fs::write(&f, svc("good", "198.19.0.12")).expect("write");
        let s = scan(&mut d);
        assert!(s.contains(&"apply Service app/good".to_owned()), "{s:?}");
        assert!(s.iter().any(|l| l.starts_with("resolved")), "{s:?}");
        // Removed for real: its objects go.
        fs::remove_file(&f).expect("rm");
        assert_eq!(scan(&mut d), vec!["delete Service app/good"]);
    }

    #[test]
    fn the_first_definition_stays_and_a_duplicate_names_both_files() {
        let (t, mut d) = tmp();
        fs::write(t.0.join("a.yaml"), svc("web", "198.19.0.10")).expect("write");
        d.initial();
        fs::write(t.0.join("b.yaml"), svc("web", "198.19.0.99")).expect("write");
        let s = scan(&mut d);
        assert_eq!(s.len(), 1, "no change in effect, one problem: {s:?}");
        assert!(s[0].contains("b.yaml: duplicate Service app/web") && s[0].contains("a.yaml stays"), "{s:?}");
        // The holder lets go: the duplicate takes over.
        fs::write(t.0.join("a.yaml"), "").expect("write");
        let s = scan(&mut d);
        assert!(s.contains(&"apply Service app/web".to_owned()), "{s:?}");
        assert!(s.iter().any(|l| l.starts_with("resolved") && l.contains("b.yaml")), "{s:?}");
    }

    #[test]
    fn polling_reads_a_file_only_once_it_stopped_changing() {
        let (t, mut d) = tmp();
        d.initial();
        fs::write(t.0.join("a.yaml"), svc("web", "198.19.0.10")).expect("write");
        let mut ev = Vec::new();
        d.scan(None, ScanMode::Debounced, &mut ev);
        assert!(ev.is_empty(), "first sight: wait");
        assert!(d.has_pending(), "the next tick must look again");
        d.scan(None, ScanMode::Debounced, &mut ev);
        assert_eq!(summary(&ev), vec!["apply Service app/web"]);
        assert!(!d.has_pending());
    }

    #[test]
    fn a_broken_file_is_not_parsed_again_until_it_changes() {
        let (t, mut d) = tmp();
        let f = t.0.join("a.yaml");
        fs::write(&f, format!("{}\nkind: [unclosed\n", "#".repeat(1000))).expect("write");
        let s = summary(&d.initial());
        assert!(s.iter().any(|l| l.contains("not valid YAML")), "{s:?}");
        let reads = d.reads();
        for mode in [ScanMode::Changed, ScanMode::Debounced, ScanMode::Debounced, ScanMode::Debounced] {
            let mut ev = Vec::new();
            d.scan(None, mode, &mut ev);
            assert!(ev.is_empty(), "{:?}", summary(&ev));
        }
        assert_eq!(d.reads(), reads, "an unchanged broken file is not parsed on every scan");
        fs::write(&f, svc("web", "198.19.0.10")).expect("fix");
        let s = scan(&mut d);
        assert!(s.contains(&"apply Service app/web".to_owned()), "{s:?}");
        assert_eq!(d.reads(), reads + 1);
    }

    #[test]
    fn a_files_problems_are_told_apart_from_those_of_a_file_whose_name_extends_it() {
        let (t, mut d) = tmp();
        fs::write(t.0.join("a.yml"), svc("web", "198.19.0.10")).expect("write");
        fs::write(t.0.join("a.yml.json"), "{").expect("write");
        d.initial();
        fs::remove_file(t.0.join("a.yml")).expect("rm");
        let s = scan(&mut d);
        assert_eq!(s, vec!["delete Service app/web"], "a.yml.json's problem stays reported");
    }

    #[test]
    fn problems_name_the_file_once() {
        let (t, mut d) = tmp();
        fs::write(t.0.join("a.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n")
            .expect("write");
        let s = summary(&d.initial());
        let line = s.iter().find(|l| l.starts_with("problem")).expect("a problem");
        assert_eq!(line.matches("a.yaml").count(), 1, "{line}");
        assert!(line.contains("document 0: Service x:"), "{line}");
    }
}
