//! Registration of this node in etcd ([`Registration`]) and the watched view
//! of all nodes ([`Membership`]); see [`crate::etcd`] for the key layout.
//!
//! Both run on their own OS thread with their own current-thread tokio
//! runtime, so that a busy engine or a saturated application runtime can
//! never starve the lease keep-alive or delay membership events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::{
    bounded, connect, nodes_prefix, parse_node_key, Backoff, EtcdConfig, NodeRecord,
};
use crate::Role;

// ---------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------

enum RegCmd {
    Update(NodeRecord),
    /// Stop the thread; revoke the lease within the duration, or leave it to
    /// expire (`None`).
    Stop(Option<Duration>),
}

/// This node's record in etcd, kept alive by a lease on a dedicated thread.
///
/// The thread grants a lease of `cfg.lease_ttl`, puts the record with it and
/// renews the lease every ttl/3. On any failure (etcd unreachable, lease
/// lost) it retries with jittered exponential backoff (100 ms to 5 s) and
/// registers again once etcd answers: the old lease if it survived, otherwise
/// a new one, and the record is put again.
pub struct Registration {
    cmds: mpsc::UnboundedSender<RegCmd>,
    registered: Arc<AtomicBool>,
    thread: Option<(JoinHandle<()>, std::sync::mpsc::Receiver<()>)>,
    key: String,
}

/// How long [`Drop`] waits for the lease revocation.
const DROP_REVOKE_TIMEOUT: Duration = Duration::from_millis(500);

impl Registration {
    /// Starts registering `record`; returns at once (registration happens in
    /// the background, see [`Registration::is_registered`]).
    pub fn start(cfg: EtcdConfig, record: NodeRecord) -> Registration {
        let (cmds, rx) = mpsc::unbounded_channel();
        let registered = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let key = record.key(&cfg.prefix);
        let flag = registered.clone();
        let thread = std::thread::Builder::new()
            .name(format!("etcd-reg-{}", record.id))
            .spawn(move || {
                // Dropped when the thread ends: `deregister` waits for that.
                let _done = done_tx;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the etcd registration");
                rt.block_on(registration_loop(cfg, record, rx, flag.clone()));
                flag.store(false, Ordering::SeqCst);
            })
            .expect("spawn the etcd registration thread");
        Registration {
            cmds,
            registered,
            thread: Some((thread, done_rx)),
            key,
        }
    }

    /// Replaces the record (e.g. capacity changed) and puts it again. Role
    /// and id should stay the same; if they change, the old key is deleted.
    pub fn update(&self, record: NodeRecord) {
        let _ = self.cmds.send(RegCmd::Update(record));
    }

    /// Whether the record is in etcd under a live lease, as far as this node
    /// knows (false while reconnecting).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// The etcd key this registration writes.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Revokes the lease (so that watchers see the node leave at once), best
    /// effort and bounded by `timeout`, and stops the thread.
    pub fn deregister(mut self, timeout: Duration) {
        self.stop(Some(timeout), timeout + Duration::from_secs(1));
    }

    /// Stops keeping the lease alive *without* revoking it, as a crashed node
    /// would: the record disappears when the lease expires (after up to
    /// `lease_ttl`). Meant for tests and for handing over to another process.
    pub fn abandon(mut self) {
        self.stop(None, Duration::from_secs(1));
    }

    fn stop(&mut self, revoke: Option<Duration>, wait: Duration) {
        let Some((thread, done)) = self.thread.take() else {
            return;
        };
        let _ = self.cmds.send(RegCmd::Stop(revoke));
        match done.recv_timeout(wait) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
            _ => {
                warn!(key = %self.key, "etcd registration thread did not stop in time; leaving it")
            }
        }
        self.registered.store(false, Ordering::SeqCst);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop(
            Some(DROP_REVOKE_TIMEOUT),
            DROP_REVOKE_TIMEOUT + Duration::from_millis(500),
        );
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("registered", &self.is_registered())
            .finish()
    }
}

enum SessionEnd {
    /// Stop requested (lease revoked or abandoned as asked).
    Stopped,
    /// All handles gone without a stop (cannot happen through the API).
    Closed,
}

async fn registration_loop(
    cfg: EtcdConfig,
    mut record: NodeRecord,
    mut cmds: mpsc::UnboundedReceiver<RegCmd>,
    registered: Arc<AtomicBool>,
) {
    let mut lease: Option<i64> = None;
    let mut written_key: Option<String> = None;
    let mut backoff = Backoff::new();
    loop {
        let res = registration_session(
            &cfg,
            &mut record,
            &mut lease,
            &mut written_key,
            &mut cmds,
            &registered,
            &mut backoff,
        )
        .await;
        registered.store(false, Ordering::SeqCst);
        let err = match res {
            Ok(SessionEnd::Stopped) | Ok(SessionEnd::Closed) => return,
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        warn!(key = %record.key(&cfg.prefix), "etcd registration: {err}; retrying in {delay:?}");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = cmds.recv() => match cmd {
                    Some(RegCmd::Update(r)) => record = r,
                    Some(RegCmd::Stop(revoke)) => {
                        if let (Some(t), Some(id)) = (revoke, lease) {
                            revoke_fresh(&cfg, id, t).await;
                        }
                        return;
                    }
                    None => return,
                },
            }
        }
    }
}

/// Revokes `lease` over a new connection, within `timeout`, best effort.
async fn revoke_fresh(cfg: &EtcdConfig, lease: i64, timeout: Duration) {
    let res = tokio::time::timeout(timeout, async {
        let mut client = connect(cfg).await?;
        bounded("lease revoke", client.lease_revoke(lease)).await
    })
    .await;
    match res {
        Ok(Ok(_)) => debug!(lease, "etcd lease revoked"),
        Ok(Err(e)) => warn!(lease, "etcd lease revoke failed: {e}"),
        Err(_) => warn!(lease, "etcd lease revoke timed out"),
    }
}

async fn put_record(
    client: &mut etcd_client::Client,
    cfg: &EtcdConfig,
    record: &NodeRecord,
    lease: i64,
    written_key: &mut Option<String>,
) -> Result<(), String> {
    let key = record.key(&cfg.prefix);
    bounded(
        "put",
        client.put(
            key.clone(),
            record.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    if let Some(old) = written_key.replace(key.clone()) {
        if old != key {
            bounded("delete", client.delete(old, None)).await?;
        }
    }
    Ok(())
}

/// Whether this node's key is still its own, when read under `lease`.
enum KeyOwner {
    Ours,
    /// Nobody's (deleted, or its lease ran out): ours to write again.
    Free,
    /// Another live node's, at another address: two nodes were given one
    /// `--node-id`, and the second would silently hide the first.
    Other(std::net::SocketAddr),
}

async fn key_owner(
    client: &mut etcd_client::Client,
    cfg: &EtcdConfig,
    record: &NodeRecord,
    lease: i64,
) -> Result<KeyOwner, String> {
    let resp = bounded("get", client.get(record.key(&cfg.prefix), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(KeyOwner::Free);
    };
    if kv.lease() == lease {
        return Ok(KeyOwner::Ours);
    }
    // The same address under another lease is this node's earlier life
    // (a restart before the old lease ran out): it is ours to take.
    Ok(match NodeRecord::from_json(kv.value()) {
        Ok(other) if other.addr != record.addr => KeyOwner::Other(other.addr),
        _ => KeyOwner::Free,
    })
}

/// The error for a key [`KeyOwner::Other`] holds.
fn taken(record: &NodeRecord, other: std::net::SocketAddr) -> String {
    format!(
        "node id {:?} is registered by another live node at {other}: give each node its own \
         --node-id (waiting for that one to leave)",
        record.id
    )
}

async fn registration_session(
    cfg: &EtcdConfig,
    record: &mut NodeRecord,
    lease: &mut Option<i64>,
    written_key: &mut Option<String>,
    cmds: &mut mpsc::UnboundedReceiver<RegCmd>,
    registered: &AtomicBool,
    backoff: &mut Backoff,
) -> Result<SessionEnd, String> {
    let mut client = connect(cfg).await?;

    // Keep the old lease if it survived the interruption (etcd renews leases
    // across restarts and leader changes), so the record never disappears.
    let mut kept = None;
    if let Some(id) = *lease {
        match bounded("lease keep-alive", client.lease_keep_alive(id)).await {
            Ok(k) => kept = Some(k),
            Err(e) => {
                info!(
                    lease = id,
                    "etcd lease not renewed ({e}); granting a new one"
                );
                *lease = None;
            }
        }
    }
    let (mut keeper, mut stream) = match kept {
        Some(k) => k,
        None => {
            let grant = bounded(
                "lease grant",
                client.lease_grant(cfg.lease_ttl_secs(), None),
            )
            .await?;
            *lease = Some(grant.id());
            bounded("lease keep-alive", client.lease_keep_alive(grant.id())).await?
        }
    };
    let id = keeper.id();
    if let KeyOwner::Other(addr) = key_owner(&mut client, cfg, record, id).await? {
        return Err(taken(record, addr));
    }
    put_record(&mut client, cfg, record, id, written_key).await?;
    registered.store(true, Ordering::SeqCst);
    backoff.reset();
    info!(key = %record.key(&cfg.prefix), lease = id, "registered in etcd");

    let period = Duration::from_millis((cfg.lease_ttl_secs() as u64 * 1000 / 3).max(100));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the oldest unanswered keep-alive was sent.
    let mut unanswered: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(sent) = unanswered {
                    if sent.elapsed() >= period {
                        return Err("no answer to the lease keep-alive".into());
                    }
                }
                keeper.keep_alive().await.map_err(|e| format!("etcd lease keep-alive: {e}"))?;
                unanswered.get_or_insert_with(tokio::time::Instant::now);
                // A record deleted by hand, or by a node that took the
                // key and left, is written again; one another live node
                // holds is its until it leaves.
                match key_owner(&mut client, cfg, record, id).await? {
                    KeyOwner::Ours => {}
                    KeyOwner::Free => {
                        warn!(key = %record.key(&cfg.prefix), "this node's etcd record was gone; registering again");
                        put_record(&mut client, cfg, record, id, written_key).await?;
                    }
                    KeyOwner::Other(addr) => return Err(taken(record, addr)),
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.ttl() <= 0 {
                        *lease = None;
                        return Err(format!("lease {id:x} expired"));
                    }
                    unanswered = None;
                }
                Ok(None) => return Err("lease keep-alive stream closed".into()),
                Err(e) => return Err(format!("lease keep-alive stream: {e}")),
            },
            cmd = cmds.recv() => match cmd {
                Some(RegCmd::Update(r)) => {
                    *record = r;
                    put_record(&mut client, cfg, record, id, written_key).await?;
                }
                Some(RegCmd::Stop(revoke)) => {
                    if let Some(t) = revoke {
                        match tokio::time::timeout(t, client.lease_revoke(id)).await {
                            Ok(Ok(_)) => debug!(lease = id, "etcd lease revoked"),
                            Ok(Err(e)) => warn!(lease = id, "etcd lease revoke failed: {e}"),
                            Err(_) => warn!(lease = id, "etcd lease revoke timed out"),
                        }
                    }
                    return Ok(SessionEnd::Stopped);
                }
                None => return Ok(SessionEnd::Closed),
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Membership
// ---------------------------------------------------------------------------

/// A change in the watched set of nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node appeared, or its record changed.
    Up(NodeRecord),
    /// A node's record disappeared (deregistered, lease expired).
    Down { role: Role, id: String },
}

type View = Arc<Mutex<BTreeMap<String, NodeRecord>>>;

/// The watched set of registered nodes under `{prefix}/nodes/`.
///
/// The first events are the current snapshot (one `Up` per node), then
/// changes. When etcd is unreachable the last known view is kept and nothing
/// is emitted; once etcd answers again the snapshot is re-read and only the
/// difference is emitted. Records with another protocol version are skipped
/// with a warning.
pub struct Membership {
    events: mpsc::UnboundedReceiver<MembershipEvent>,
    view: View,
    cancel: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Membership {
    /// Starts watching; returns at once.
    pub fn watch(cfg: EtcdConfig) -> Membership {
        let (tx, events) = mpsc::unbounded_channel();
        let view: View = Arc::default();
        let cancel = CancellationToken::new();
        let (v, c) = (view.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("etcd-membership".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the etcd membership watch");
                rt.block_on(watch_loop(cfg, tx, v, c));
            })
            .expect("spawn the etcd membership thread");
        Membership {
            events,
            view,
            cancel,
            thread: Some(thread),
        }
    }

    /// The event stream (snapshot first, then changes).
    pub fn events(&mut self) -> &mut mpsc::UnboundedReceiver<MembershipEvent> {
        &mut self.events
    }

    /// The current view, ordered by role and id.
    pub fn current(&self) -> Vec<NodeRecord> {
        self.view.lock().unwrap().values().cloned().collect()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("nodes", &self.view.lock().unwrap().len())
            .finish()
    }
}

async fn watch_loop(
    cfg: EtcdConfig,
    tx: mpsc::UnboundedSender<MembershipEvent>,
    view: View,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => return,
            e = watch_session(&cfg, &tx, &view, &mut backoff) => e,
        };
        let delay = backoff.next_delay();
        warn!("etcd membership watch: {err}; keeping the last known view, retrying in {delay:?}");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The record under `key`, if it is one tandem should report.
fn decode_record(cfg: &EtcdConfig, key: &str, value: &[u8]) -> Option<NodeRecord> {
    let (role, id) = parse_node_key(&cfg.prefix, key)?;
    let record = match NodeRecord::from_json(value) {
        Ok(r) => r,
        Err(e) => {
            warn!(key, "ignoring an unreadable node record: {e}");
            return None;
        }
    };
    if record.protocol_version != crate::PROTOCOL_VERSION {
        warn!(
            key,
            "ignoring a node with protocol version {} (this node speaks {})",
            record.protocol_version,
            crate::PROTOCOL_VERSION
        );
        return None;
    }
    if record.role != role || record.id != id {
        warn!(
            key,
            "ignoring a node record whose role/id do not match its key"
        );
        return None;
    }
    Some(record)
}

fn emit(tx: &mpsc::UnboundedSender<MembershipEvent>, ev: MembershipEvent) {
    debug!(?ev, "membership");
    let _ = tx.send(ev);
}

/// Sets `key` to `record` (None: absent) in the view, emitting what changed.
fn apply(
    view: &mut BTreeMap<String, NodeRecord>,
    tx: &mpsc::UnboundedSender<MembershipEvent>,
    key: &str,
    record: Option<NodeRecord>,
) {
    match record {
        Some(r) => {
            if view.get(key) != Some(&r) {
                view.insert(key.to_string(), r.clone());
                emit(tx, MembershipEvent::Up(r));
            }
        }
        None => {
            if let Some(old) = view.remove(key) {
                emit(
                    tx,
                    MembershipEvent::Down {
                        role: old.role,
                        id: old.id,
                    },
                );
            }
        }
    }
}

async fn watch_session(
    cfg: &EtcdConfig,
    tx: &mpsc::UnboundedSender<MembershipEvent>,
    view: &View,
    backoff: &mut Backoff,
) -> String {
    match watch_session_inner(cfg, tx, view, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

async fn watch_session_inner(
    cfg: &EtcdConfig,
    tx: &mpsc::UnboundedSender<MembershipEvent>,
    view: &View,
    backoff: &mut Backoff,
) -> Result<Never, String> {
    let mut client = connect(cfg).await?;
    let dir = nodes_prefix(&cfg.prefix);
    let snapshot = bounded(
        "get",
        client.get(dir.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = snapshot
        .header()
        .map(|h| h.revision())
        .ok_or("etcd get: no response header")?;
    let mut fresh = BTreeMap::new();
    for kv in snapshot.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        if let Some(r) = decode_record(cfg, key, kv.value()) {
            fresh.insert(key.to_string(), r);
        }
    }
    {
        // Emit the difference against the last known view.
        let mut v = view.lock().unwrap();
        let gone: Vec<String> = v
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            apply(&mut v, tx, &k, None);
        }
        for (k, r) in fresh {
            apply(&mut v, tx, &k, Some(r));
        }
    }
    debug!(revision, "membership snapshot read; watching");

    let mut stream = bounded(
        "watch",
        client.watch(
            dir,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err("watch stream closed".into()),
            Err(e) => return Err(format!("watch stream: {e}")),
        };
        if resp.created() {
            backoff.reset();
        }
        if resp.canceled() {
            return Err(if resp.compact_revision() > 0 {
                format!(
                    "watch revision {} compacted (now {}); resynchronising",
                    revision + 1,
                    resp.compact_revision()
                )
            } else {
                format!("watch canceled: {}", resp.cancel_reason())
            });
        }
        let mut v = view.lock().unwrap();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    let r = decode_record(cfg, key, kv.value());
                    apply(&mut v, tx, key, r);
                }
                EventType::Delete => apply(&mut v, tx, key, None),
            }
        }
    }
}
