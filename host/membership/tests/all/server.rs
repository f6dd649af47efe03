use std::sync::Arc;
use std::time::Duration;

use braid_membership::pki;
use braid_membership::{Approval, MapServer, MapServerConfig, MembershipError, Registration};

use crate::common::{ALICE, BOB, CAROL, Net, net};

fn open(n: &Net, approval: Approval, horizon: Duration) -> MapServer {
    MapServer::open(MapServerConfig {
        state: std::sync::Arc::new(braid_membership::FileState::new(n.state_path())),
        group: "braid-dev".into(),
        operator_key_pkcs8_der: n.op_key.clone(),
        network_ca_der: n.ca_der.clone(),
        approval,
        event_horizon: horizon,
    })
    .unwrap()
}

fn names(s: &MapServer, n: &Net) -> Vec<String> {
    let view = s
        .signed_map()
        .verify(&n.op_pub, &n.ca_der, pki::now_ms())
        .unwrap();
    view.members().iter().map(|m| m.name.to_string()).collect()
}

const DAY: Duration = Duration::from_secs(86400);

#[test]
fn auto_approval() {
    let n = net(&["alice", "bob"]);
    let s = open(&n, Approval::Auto, DAY);
    let v0 = s.version();
    assert_eq!(
        s.register(n.member(0, ALICE, 1, 1)).unwrap(),
        Registration::Approved
    );
    assert_eq!(
        s.register(n.member(1, BOB, 2, 1)).unwrap(),
        Registration::Approved
    );
    assert_eq!(names(&s, &n), [ALICE, BOB]);
    assert_eq!(s.version(), v0 + 2);
    assert!(s.pending().is_empty());
}

#[test]
fn manual_approval_then_approve_and_reject() {
    let n = net(&["alice", "bob"]);
    let s = open(&n, Approval::Manual, DAY);
    let alice_record = n.member(0, ALICE, 1, 1);
    assert_eq!(
        s.register(alice_record.clone()).unwrap(),
        Registration::Pending
    );
    assert_eq!(
        s.register(n.member(1, BOB, 2, 1)).unwrap(),
        Registration::Pending
    );
    assert!(names(&s, &n).is_empty());
    assert_eq!(s.pending().len(), 2);
    let alice = ALICE.parse().unwrap();
    s.approve(&alice).unwrap();
    assert!(matches!(
        s.approve(&alice),
        Err(MembershipError::NotPending { .. })
    ));
    assert_eq!(names(&s, &n), [ALICE]);
    // Still approved after republishing.
    assert_eq!(s.register(alice_record).unwrap(), Registration::Approved);
    assert_eq!(
        s.register(n.member(0, ALICE, 1, 2)).unwrap(),
        Registration::Approved
    );
    s.reject(&BOB.parse().unwrap()).unwrap();
    assert!(s.pending().is_empty());
    assert!(matches!(
        s.approve(&CAROL.parse().unwrap()),
        Err(MembershipError::UnknownMember { .. })
    ));
}

#[test]
fn serial_rules() {
    let n = net(&["alice"]);
    let s = open(&n, Approval::Auto, DAY);
    let first = n.member(0, ALICE, 1, 5);
    s.register(first.clone()).unwrap();
    // Same serial, same bytes: a refresh.
    let v = s.version();
    assert_eq!(s.register(first.clone()).unwrap(), Registration::Approved);
    assert!(s.version() > v);
    // Same serial, other content.
    let mut info = n.info(0, ALICE, 1, 5);
    info.endpoint = "https://127.0.0.1:9999".into();
    let other = braid_membership::SignedMemberInfo::sign(&info, &n.creds(0).1).unwrap();
    assert!(matches!(
        s.register(other),
        Err(MembershipError::SerialReused { serial: 5, .. })
    ));
    // Lower serial.
    let err = s.register(n.member(0, ALICE, 1, 4)).unwrap_err();
    assert!(
        matches!(
            err,
            MembershipError::StaleSerial {
                offered: 4,
                current: 5,
                ..
            }
        ),
        "{err}"
    );
    // Higher serial updates the record.
    s.register(n.member(0, ALICE, 7, 6)).unwrap();
    let view = s
        .signed_map()
        .verify(&n.op_pub, &n.ca_der, pki::now_ms())
        .unwrap();
    assert_eq!(view.members()[0].session_key, [7; 32]);
    assert_eq!(view.members()[0].serial, 6);
}

#[test]
fn conflicts() {
    let n = net(&["alice", "bob"]);
    let s = open(&n, Approval::Auto, DAY);
    s.register(n.member(0, ALICE, 1, 1)).unwrap();
    // Another node claims Alice's name.
    let err = s.register(n.member(1, ALICE, 2, 2)).unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // Another member with Alice's session key.
    let err = s.register(n.member(1, BOB, 1, 1)).unwrap_err();
    assert!(
        matches!(&err, MembershipError::Conflict { field: "session key", other, .. } if other == ALICE),
        "{err}"
    );
    // Alice's certificate, claimed at another endpoint.
    let mut info = n.info(0, CAROL, 3, 1);
    info.endpoint = "https://127.0.0.1:9".into();
    let carol = braid_membership::SignedMemberInfo::sign(&info, &n.creds(0).1).unwrap();
    let err = s.register(carol).unwrap_err();
    assert!(
        matches!(
            err,
            MembershipError::Conflict {
                field: "TLS certificate",
                ..
            }
        ),
        "{err}"
    );
    // A second vnode of Alice's node (same certificate, same gateway): fine.
    s.register(n.member(0, CAROL, 3, 1)).unwrap();
    // Wrong group.
    let mut info = n.info(1, BOB, 4, 1);
    info.group = "other".into();
    let bob = braid_membership::SignedMemberInfo::sign(&info, &n.creds(1).1).unwrap();
    assert!(matches!(
        s.register(bob),
        Err(MembershipError::InvalidRecord { .. })
    ));
    assert_eq!(names(&s, &n), [ALICE, CAROL]);
}

#[test]
fn expiry_by_event_horizon() {
    let n = net(&["alice", "bob"]);
    let s = open(&n, Approval::Auto, Duration::from_secs(60));
    s.register(n.member(0, ALICE, 1, 1)).unwrap();
    s.register(n.member(1, BOB, 2, 1)).unwrap();
    let now = pki::now_ms();
    assert!(s.expire(now + 30_000).unwrap().is_empty());
    let gone = s.expire(now + 120_000).unwrap();
    assert_eq!(gone.len(), 2);
    assert!(names(&s, &n).is_empty());
}

#[test]
fn state_survives_reopen() {
    let n = net(&["alice", "bob"]);
    let version = {
        let s = open(&n, Approval::Manual, DAY);
        s.register(n.member(0, ALICE, 1, 1)).unwrap();
        s.approve(&ALICE.parse().unwrap()).unwrap();
        s.register(n.member(1, BOB, 2, 1)).unwrap();
        s.version()
    };
    let s = Arc::new(open(&n, Approval::Manual, DAY));
    assert_eq!(s.version(), version);
    assert_eq!(names(&s, &n), [ALICE]);
    assert_eq!(s.pending()[0].name.as_str(), BOB);
    // Serial rules hold across the restart.
    assert!(s.register(n.member(0, ALICE, 1, 0)).is_err());
    // Another group's server refuses the file.
    let err = MapServer::open(MapServerConfig {
        state: std::sync::Arc::new(braid_membership::FileState::new(n.state_path())),
        group: "other".into(),
        operator_key_pkcs8_der: n.op_key.clone(),
        network_ca_der: n.ca_der.clone(),
        approval: Approval::Auto,
        event_horizon: DAY,
    })
    .unwrap_err();
    assert!(matches!(err, MembershipError::Config { .. }), "{err}");
}

/// A state several map servers share, written only on what its writer
/// read (as a cluster's store does).
#[derive(Debug, Default)]
struct Shared(std::sync::Mutex<Option<Vec<u8>>>);

impl braid_membership::MapStateStore for Shared {
    fn load(&self) -> Result<Option<Vec<u8>>, MembershipError> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn save(&self, bytes: &[u8]) -> Result<(), MembershipError> {
        *self.0.lock().unwrap() = Some(bytes.to_vec());
        Ok(())
    }
    fn save_if(&self, expected: Option<&[u8]>, bytes: &[u8]) -> Result<(), MembershipError> {
        let mut s = self.0.lock().unwrap();
        if s.as_deref() != expected {
            return Err(MembershipError::StateChanged);
        }
        *s = Some(bytes.to_vec());
        Ok(())
    }
    fn location(&self) -> std::path::PathBuf {
        "shared".into()
    }
}

#[test]
fn map_servers_that_share_their_state_lose_no_change_of_one_another() {
    let n = net(&["alice", "bob", "carol"]);
    let state = Arc::new(Shared::default());
    let open = || {
        MapServer::open(MapServerConfig {
            state: state.clone(),
            group: "braid-dev".into(),
            operator_key_pkcs8_der: n.op_key.clone(),
            network_ca_der: n.ca_der.clone(),
            approval: Approval::Manual,
            event_horizon: DAY,
        })
        .unwrap()
    };
    let (one, two) = (open(), open());
    // Each takes a registration on the state as it last read it: the
    // second's first write finds the state changed, reads it again and
    // keeps the first's change.
    assert_eq!(
        one.register(n.member(0, ALICE, 1, 1)).unwrap(),
        Registration::Pending
    );
    assert_eq!(
        two.register(n.member(1, BOB, 2, 1)).unwrap(),
        Registration::Pending
    );
    let pending = |s: &MapServer| {
        let mut p: Vec<String> = s.pending().iter().map(|m| m.name.to_string()).collect();
        p.sort();
        p
    };
    assert_eq!(pending(&two), [ALICE, BOB]);
    // The first serves what the second wrote once it refreshes.
    assert!(one.refresh().unwrap(), "the state had changed");
    assert!(!one.refresh().unwrap(), "and has not since");
    assert_eq!(pending(&one), [ALICE, BOB]);
    // Approvals through either, each on a stale copy of the other's.
    one.approve(&ALICE.parse().unwrap()).unwrap();
    two.approve(&BOB.parse().unwrap()).unwrap();
    assert!(matches!(
        one.approve(&BOB.parse().unwrap()),
        Err(MembershipError::NotPending { .. })
    ));
    assert_eq!(
        two.register(n.member(2, CAROL, 3, 1)).unwrap(),
        Registration::Pending
    );
    one.reject(&CAROL.parse().unwrap()).unwrap();
    two.refresh().unwrap();
    assert_eq!(names(&one, &n), [ALICE, BOB]);
    assert_eq!(names(&two, &n), [ALICE, BOB]);
    assert_eq!(one.version(), two.version());
    // A third opened now reads the same.
    let three = open();
    assert_eq!(names(&three, &n), [ALICE, BOB]);
    assert!(three.pending().is_empty());
}
