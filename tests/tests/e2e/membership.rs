//! Membership through a real etcd (Debian `etcd-server`), on loopback only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_cluster::{Membership, MembershipEvent, NodeRecord, Registration, Role};
use tandem_tests::etcd::Etcd;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn record(role: Role, id: &str, port: u16) -> NodeRecord {
    let mut r = NodeRecord::new(role, id, SocketAddr::from(([127, 0, 0, 1], port)));
    r.kv_addr = Some(SocketAddr::from(([127, 0, 0, 1], port + 1)));
    r.model_fingerprint = "fp-test".into();
    r.capacity_blocks = 128;
    r
}

/// The next event within `within`, if any.
async fn next_event(m: &mut Membership, within: Duration) -> Option<MembershipEvent> {
    tokio::time::timeout(within, m.events().recv())
        .await
        .ok()
        .flatten()
}

/// Collects events until `done` holds for the collected list, failing after `within`.
async fn events_until(
    m: &mut Membership,
    within: Duration,
    done: impl Fn(&[MembershipEvent]) -> bool,
) -> Vec<MembershipEvent> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(m, left).await {
            Some(e) => seen.push(e),
            None => panic!("timed out after {within:?}; events so far: {seen:#?}"),
        }
    }
    seen
}

fn is_up(e: &MembershipEvent, id: &str) -> bool {
    matches!(e, MembershipEvent::Up(r) if r.id == id)
}

fn is_down(e: &MembershipEvent, id: &str) -> bool {
    matches!(e, MembershipEvent::Down { id: i, .. } if i == id)
}

async fn wait_registered(r: &Registration, within: Duration) {
    let deadline = Instant::now() + within;
    while !r.is_registered() {
        assert!(
            Instant::now() < deadline,
            "{r:?} not registered within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_nodes_up_then_one_down_on_deregister() {
    let etcd = Etcd::start();
    let cfg = etcd.config("/t-two", Duration::from_secs(30));
    let p = record(Role::Prefill, "p1", 7001);
    let d = record(Role::Decode, "d1", 7101);
    let rp = Registration::start(cfg.clone(), p.clone());
    let rd = Registration::start(cfg.clone(), d.clone());
    let mut m = Membership::watch(cfg.clone());

    let seen = events_until(&mut m, Duration::from_secs(10), |s| {
        s.iter().any(|e| is_up(e, "p1")) && s.iter().any(|e| is_up(e, "d1"))
    })
    .await;
    assert!(seen.contains(&MembershipEvent::Up(p.clone())), "{seen:#?}");
    assert!(seen.contains(&MembershipEvent::Up(d.clone())), "{seen:#?}");
    assert!(!seen
        .iter()
        .any(|e| matches!(e, MembershipEvent::Down { .. })));
    wait_registered(&rp, Duration::from_secs(5)).await;
    wait_registered(&rd, Duration::from_secs(5)).await;
    // The key layout other tools rely on.
    assert_eq!(rd.key(), "/t-two/nodes/decode/d1");

    // A capacity change reaches the watcher as an Up with the new record.
    let mut p2 = p.clone();
    p2.capacity_blocks = 64;
    rp.update(p2.clone());
    let seen = events_until(&mut m, Duration::from_secs(5), |s| !s.is_empty()).await;
    assert_eq!(seen, vec![MembershipEvent::Up(p2.clone())]);

    let t0 = Instant::now();
    rd.deregister(Duration::from_secs(2));
    let seen = events_until(&mut m, Duration::from_secs(2), |s| {
        s.iter().any(|e| is_down(e, "d1"))
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        seen,
        vec![MembershipEvent::Down {
            role: Role::Decode,
            id: "d1".into()
        }]
    );
    assert_eq!(m.current(), vec![p2]);
    rp.deregister(Duration::from_secs(2));
}

#[tokio::test]
async fn crashed_node_expires_with_its_lease() {
    let etcd = Etcd::start();
    let cfg = etcd.config("/t-crash", Duration::from_secs(2));
    let n = record(Role::Decode, "crashy", 7201);
    let r = Registration::start(cfg.clone(), n.clone());
    let mut m = Membership::watch(cfg.clone());
    events_until(&mut m, Duration::from_secs(10), |s| {
        s.contains(&MembershipEvent::Up(n.clone()))
    })
    .await;
    wait_registered(&r, Duration::from_secs(5)).await;
    // Still there after a few keep-alive periods.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(m.current(), vec![n.clone()]);

    let t0 = Instant::now();
    r.abandon();
    events_until(&mut m, Duration::from_millis(4500), |s| {
        s.iter().any(|e| is_down(e, "crashy"))
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "expired too soon"
    );
    assert!(m.current().is_empty());
}

#[tokio::test]
async fn survives_an_etcd_outage() {
    let mut etcd = Etcd::start();
    let cfg = etcd.config("/t-outage", Duration::from_secs(30));
    let steady = record(Role::Prefill, "steady", 7301);
    let late = record(Role::Decode, "late", 7401);
    let r1 = Registration::start(cfg.clone(), steady.clone());
    let mut m = Membership::watch(cfg.clone());
    events_until(&mut m, Duration::from_secs(10), |s| {
        s.contains(&MembershipEvent::Up(steady.clone()))
    })
    .await;
    wait_registered(&r1, Duration::from_secs(5)).await;

    etcd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Registered while etcd is down: must appear once etcd is back.
    let r2 = Registration::start(cfg.clone(), late.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!r2.is_registered());
    // The watcher kept its view and said nothing.
    assert_eq!(m.current(), vec![steady.clone()]);
    assert_eq!(next_event(&mut m, Duration::from_millis(10)).await, None);

    etcd.restart();
    let seen = events_until(&mut m, Duration::from_secs(20), |s| {
        s.contains(&MembershipEvent::Up(late.clone()))
    })
    .await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, MembershipEvent::Down { .. })),
        "{seen:#?}"
    );
    wait_registered(&r1, Duration::from_secs(15)).await;
    wait_registered(&r2, Duration::from_secs(15)).await;
    // Let things settle: still no Down, both there.
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some(e) = next_event(&mut m, deadline.saturating_duration_since(Instant::now())).await
    {
        assert!(!matches!(e, MembershipEvent::Down { .. }), "{e:?}");
    }
    let mut now = m.current();
    now.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(now, vec![late.clone(), steady.clone()]);

    // A fresh watcher agrees (the records really are in etcd).
    let mut m2 = Membership::watch(cfg.clone());
    events_until(&mut m2, Duration::from_secs(10), |s| s.len() == 2).await;
    r1.deregister(Duration::from_secs(2));
    r2.deregister(Duration::from_secs(2));
}

#[tokio::test]
async fn other_protocol_versions_are_not_reported() {
    let etcd = Etcd::start();
    let cfg = etcd.config("/t-version", Duration::from_secs(30));
    let mut m = Membership::watch(cfg.clone());
    let mut alien = record(Role::Decode, "alien", 7501);
    alien.protocol_version = tandem_cluster::PROTOCOL_VERSION + 1;
    let good = record(Role::Decode, "good", 7601);
    // Watch path: the alien is registered first, then a good node.
    let ra = Registration::start(cfg.clone(), alien.clone());
    wait_registered(&ra, Duration::from_secs(10)).await;
    let rg = Registration::start(cfg.clone(), good.clone());
    let seen = events_until(&mut m, Duration::from_secs(10), |s| {
        s.iter().any(|e| is_up(e, "good"))
    })
    .await;
    assert_eq!(seen, vec![MembershipEvent::Up(good.clone())]);
    assert_eq!(next_event(&mut m, Duration::from_millis(500)).await, None);
    assert_eq!(m.current(), vec![good.clone()]);

    // Snapshot path: a new watcher sees only the good node.
    let mut m2 = Membership::watch(cfg.clone());
    let seen = events_until(&mut m2, Duration::from_secs(10), |s| !s.is_empty()).await;
    assert_eq!(seen, vec![MembershipEvent::Up(good.clone())]);
    assert_eq!(next_event(&mut m2, Duration::from_millis(500)).await, None);
    ra.deregister(Duration::from_secs(2));
    rg.deregister(Duration::from_secs(2));
}

/// Two nodes given one `--node-id`: the second waits instead of hiding the
/// first (whose record would vanish with the second's lease), and takes
/// the id once the first has left. A node restarted at its own address
/// takes its key back at once, old lease or not.
#[tokio::test]
async fn a_node_id_is_held_by_one_live_node() {
    let etcd = Etcd::start();
    let cfg = etcd.config("/t-dup", Duration::from_secs(2));
    let first = record(Role::Decode, "dup", 7701);
    let second = record(Role::Decode, "dup", 7801);
    let r1 = Registration::start(cfg.clone(), first.clone());
    wait_registered(&r1, Duration::from_secs(10)).await;
    let mut m = Membership::watch(cfg.clone());
    events_until(&mut m, Duration::from_secs(10), |s| {
        s.contains(&MembershipEvent::Up(first.clone()))
    })
    .await;

    let r2 = Registration::start(cfg.clone(), second.clone());
    // Several of the first's keep-alive periods: the second never writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!r2.is_registered());
    assert_eq!(next_event(&mut m, Duration::from_millis(100)).await, None);
    assert_eq!(m.current(), vec![first.clone()]);

    r1.deregister(Duration::from_secs(2));
    let seen = events_until(&mut m, Duration::from_secs(10), |s| {
        s.contains(&MembershipEvent::Up(second.clone()))
    })
    .await;
    assert!(seen.iter().any(|e| is_down(e, "dup")), "{seen:#?}");
    wait_registered(&r2, Duration::from_secs(5)).await;

    // The second dies (its lease lives on) and restarts at its address.
    r2.abandon();
    let again = Registration::start(cfg.clone(), second.clone());
    wait_registered(&again, Duration::from_secs(5)).await;
    // Past the old lease's end, the record is still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(m.current(), vec![second.clone()]);
    again.deregister(Duration::from_secs(2));
}
