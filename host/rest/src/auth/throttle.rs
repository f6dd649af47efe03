//! The failed-login throttle, on an explicit clock (ms).
//!
//! Failures are counted per (login, source address) and per source
//! address. A login that keeps failing from one address is locked *for
//! that address only*: the real user, elsewhere, is not affected (and a
//! credential already verified is never throttled, see [`crate::Auth`]).
//! Logins of users that do not exist count the same way, so the throttle
//! says nothing about who exists. An address that fails many logins,
//! whichever they are, is locked as a whole.
//!
//! Each lock lasts [`Policy::base_lock_ms`], doubled by every further
//! failure after a lock (up to [`Policy::max_lock_ms`]); requests refused
//! while locked do not count. A success forgets the (login, address)
//! pair; the address count is forgotten only with time. Both tables are
//! bounded: when full, the entry touched longest ago goes.
//!
//! IPv6 addresses are counted per /64, the block one host usually has.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

/// A source address as the throttle counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    /// An IPv4 address (IPv4-mapped IPv6 included).
    V4(u32),
    /// The /64 prefix of an IPv6 address.
    V6(u64),
    /// No address known (a server without connection info).
    Unknown,
}

impl Source {
    /// The throttle's view of `ip`.
    pub(crate) fn of(ip: Option<IpAddr>) -> Source {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(a)) => Source::V4(a.into()),
            Some(IpAddr::V6(a)) => Source::V6((u128::from(a) >> 64) as u64),
            None => Source::Unknown,
        }
    }
}

/// When failures turn into a lock, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Failures within [`Policy::window_ms`] before the first lock.
    pub(crate) max_failures: u32,
    /// The window failures are counted in.
    pub(crate) window_ms: u64,
    /// The first lock.
    pub(crate) base_lock_ms: u64,
    /// The longest lock.
    pub(crate) max_lock_ms: u64,
    /// After this long without failures, everything is forgotten.
    pub(crate) forget_ms: u64,
}

/// Per (login, address): 5 failures a minute, then 5 s, 10 s, … 15 min.
pub(crate) const PER_LOGIN: Policy = Policy {
    max_failures: 5,
    window_ms: 60_000,
    base_lock_ms: 5_000,
    max_lock_ms: 15 * 60_000,
    forget_ms: 15 * 60_000,
};

/// Per address, whatever the logins: 100 failures a minute (more than a
/// few people mistyping behind one NAT), then 5 s, 10 s, … 15 min.
pub(crate) const PER_SOURCE: Policy = Policy {
    max_failures: 100,
    ..PER_LOGIN
};

/// Entries kept per table (about 100 bytes each).
pub(crate) const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Default, Clone)]
struct Failures {
    window_start: u64,
    in_window: u32,
    locks: u32,
    locked_until: u64,
    last_failure: u64,
}

impl Failures {
    fn fail(&mut self, p: &Policy, now: u64) {
        if now.saturating_sub(self.last_failure) > p.forget_ms {
            *self = Failures::default();
        }
        self.last_failure = now;
        if now.saturating_sub(self.window_start) >= p.window_ms {
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.locks > 0 || self.in_window >= p.max_failures {
            let lock = p
                .base_lock_ms
                .saturating_mul(1 << self.locks.min(20))
                .min(p.max_lock_ms);
            self.locks += 1;
            self.locked_until = now + lock;
            self.in_window = 0;
        }
    }

    fn wait(&self, p: &Policy, now: u64) -> Option<u64> {
        let forgotten = now.saturating_sub(self.last_failure) > p.forget_ms;
        (!forgotten && now < self.locked_until).then(|| self.locked_until - now)
    }
}

/// A map that keeps at most `cap` entries, dropping the one touched
/// longest ago.
#[derive(Debug)]
struct Bounded<K, V> {
    entries: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    seq: u64,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Default> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
            cap: cap.max(1),
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.entries.get(k).map(|(v, _)| v)
    }

    /// The entry for `k`, made the most recently touched.
    fn touch(&mut self, k: K) -> &mut V {
        self.seq += 1;
        let seq = self.seq;
        if let Some((_, old)) = self.entries.get(&k) {
            self.order.remove(old);
        } else if self.entries.len() >= self.cap
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.entries.remove(&oldest);
        }
        self.order.insert(seq, k.clone());
        let e = self.entries.entry(k).or_insert_with(|| (V::default(), 0));
        e.1 = seq;
        &mut e.0
    }

    fn remove(&mut self, k: &K) {
        if let Some((_, seq)) = self.entries.remove(k) {
            self.order.remove(&seq);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Why a login is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locked {
    /// This login failed too often from this address.
    Login {
        /// ms until the lock ends.
        wait_ms: u64,
    },
    /// This address failed too many logins.
    Source {
        /// ms until the lock ends.
        wait_ms: u64,
    },
}

/// The throttle: see the module documentation.
#[derive(Debug)]
pub(crate) struct Throttle {
    logins: Bounded<(String, Source), Failures>,
    sources: Bounded<Source, Failures>,
    per_login: Policy,
    per_source: Policy,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(PER_LOGIN, PER_SOURCE, MAX_ENTRIES)
    }
}

impl Throttle {
    /// A throttle with these policies, keeping `cap` entries per table.
    pub(crate) fn new(per_login: Policy, per_source: Policy, cap: usize) -> Throttle {
        Throttle {
            logins: Bounded::new(cap),
            sources: Bounded::new(cap),
            per_login,
            per_source,
        }
    }

    /// `Err` while `login` from `source` is locked out.
    pub(crate) fn check(&self, login: &str, source: Source, now: u64) -> Result<(), Locked> {
        let key = (login.to_owned(), source);
        if let Some(wait_ms) = self
            .logins
            .get(&key)
            .and_then(|f| f.wait(&self.per_login, now))
        {
            return Err(Locked::Login { wait_ms });
        }
        if let Some(wait_ms) = self
            .sources
            .get(&source)
            .and_then(|f| f.wait(&self.per_source, now))
        {
            return Err(Locked::Source { wait_ms });
        }
        Ok(())
    }

    /// Records a failed login.
    pub(crate) fn failure(&mut self, login: &str, source: Source, now: u64) {
        self.logins
            .touch((login.to_owned(), source))
            .fail(&self.per_login, now);
        self.sources.touch(source).fail(&self.per_source, now);
    }

    /// A successful login forgets the failures of `login` from `source`.
    pub(crate) fn success(&mut self, login: &str, source: Source) {
        self.logins.remove(&(login.to_owned(), source));
    }

    /// Entries held, (login, address) pairs and addresses.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.logins.len(), self.sources.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Source = Source::V4(0x7f00_0001);
    const B: Source = Source::V4(0x7f00_0002);

    fn wait(r: Result<(), Locked>) -> u64 {
        match r {
            Err(Locked::Login { wait_ms } | Locked::Source { wait_ms }) => wait_ms,
            Ok(()) => panic!("not locked"),
        }
    }

    #[test]
    fn a_login_locks_for_one_address_with_growing_backoff() {
        let mut t = Throttle::default();
        let now = 1_000_000;
        for i in 0..4 {
            t.failure("x", A, now + i);
            assert!(t.check("x", A, now + i).is_ok(), "locked after {}", i + 1);
        }
        t.failure("x", A, now + 4);
        let first = wait(t.check("x", A, now + 5));
        assert!(first > 4_000 && first <= 5_000, "first lock {first} ms");
        // Another address, another login: unaffected.
        assert!(t.check("x", B, now + 5).is_ok());
        assert!(t.check("y", A, now + 5).is_ok());
        // The lock ends; the next failure locks again, for longer.
        let later = now + 4 + 5_000;
        assert!(t.check("x", A, later).is_ok());
        t.failure("x", A, later);
        assert_eq!(wait(t.check("x", A, later)), 10_000);
        t.failure("x", A, later + 10_000);
        assert_eq!(wait(t.check("x", A, later + 10_000)), 20_000);
        // A success forgets the pair.
        t.success("x", A);
        assert!(t.check("x", A, later + 10_000).is_ok());
        t.failure("x", A, later + 10_001);
        assert!(t.check("x", A, later + 10_001).is_ok());
    }

    #[test]
    fn locks_stop_growing_at_the_maximum() {
        let mut t = Throttle::default();
        let mut now = 0;
        for _ in 0..40 {
            t.failure("x", A, now);
            now += 1;
        }
        t.failure("x", A, now);
        assert_eq!(wait(t.check("x", A, now)), PER_LOGIN.max_lock_ms);
    }

    #[test]
    fn old_failures_are_forgotten() {
        let mut t = Throttle::default();
        for i in 0..4 {
            t.failure("x", A, i * 1000);
        }
        // The window has moved on: these four are old.
        t.failure("x", A, 61_000 + 3000);
        assert!(t.check("x", A, 64_000).is_ok());
        // A lock is forgotten after a quiet quarter of an hour.
        for i in 0..5 {
            t.failure("y", A, 100_000 + i);
        }
        assert!(t.check("y", A, 100_005).is_err());
        t.failure("y", A, 100_000 + 16 * 60_000);
        assert!(t.check("y", A, 100_000 + 16 * 60_000).is_ok());
    }

    #[test]
    fn an_address_failing_many_logins_is_locked() {
        let mut t = Throttle::default();
        for i in 0..u64::from(PER_SOURCE.max_failures) - 1 {
            t.failure(&format!("ghost-{i}"), A, 1000 + i);
        }
        assert!(t.check("anyone", A, 2000).is_ok());
        t.failure("ghost-last", A, 2000);
        assert!(matches!(
            t.check("anyone", A, 2001),
            Err(Locked::Source { .. })
        ));
        assert!(t.check("anyone", B, 2001).is_ok());
        // A success of one login does not lift the address's lock.
        t.success("anyone", A);
        assert!(t.check("anyone", A, 2001).is_err());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_entries_go() {
        let mut t = Throttle::new(PER_LOGIN, PER_SOURCE, 100);
        for i in 0..1000u32 {
            t.failure(&format!("u{i}"), Source::V4(i), u64::from(i));
        }
        assert_eq!(t.len(), (100, 100));
        // The newest are kept, with their counts.
        for _ in 0..4 {
            t.failure("u999", Source::V4(999), 2000);
        }
        assert!(t.check("u999", Source::V4(999), 2000).is_err());
        // A touched entry is kept over older ones.
        for i in 0..4 {
            t.failure("keep", A, 3000 + i);
            for j in 0..30u32 {
                t.failure(&format!("v{i}-{j}"), Source::V4(5000 + j), 3000 + i);
            }
        }
        t.failure("keep", A, 4000);
        assert!(t.check("keep", A, 4000).is_err());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(Some(a)), Source::of(Some(b)));
        assert_ne!(Source::of(Some(a)), Source::of(Some(c)));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(Source::of(Some(mapped)), Source::of(Some(v4)));
        assert_eq!(Source::of(None), Source::Unknown);
    }
}
