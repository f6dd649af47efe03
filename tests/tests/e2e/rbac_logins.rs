//! Logins under attack: wrong passwords from one source address slow that
//! address down without locking the real user out, and a flood of logins
//! for unknown users neither exhausts the node's memory nor stops an
//! authenticated admin from being served.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use braid_e2e::{ADMIN_PASSWORD, ADMIN_USER, Api, DEADLINE, Node, rss_kib, wait_until};
use serde_json::{Value, json};

/// One GET as `login`: status, the `Retry-After` seconds, the body.
fn get_as(api: &Api, path: &str, login: &str, password: &str) -> (u16, Option<u64>, Value) {
    let resp = api
        .client()
        .get(api.url(path))
        .basic_auth(login, Some(password))
        .send()
        .unwrap_or_else(|e| panic!("GET {path} as {login}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.json().unwrap_or(Value::Null);
    (status, retry_after, body)
}

#[test]
fn wrong_passwords_from_one_address_do_not_lock_out_the_real_user() {
    let node = Node::start();
    let admin = node.api().clone();
    let vnodes = "/api/v1/virtualnode";
    let attacker = admin.bound_to("127.0.0.2".parse::<IpAddr>().unwrap());
    let guess = "not-the-admin-password";

    // The attacker guesses admin's password from 127.0.0.2 until locked.
    let mut statuses = Vec::new();
    let mut first_lock = None;
    for _ in 0..8 {
        let (status, retry_after, body) = get_as(&attacker, vnodes, ADMIN_USER, guess);
        if status == 429 {
            assert_eq!(body["code"], "TOO_MANY_FAILED_LOGINS", "{body}");
            let secs = retry_after.expect("a 429 carries Retry-After");
            first_lock.get_or_insert(secs);
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], &[401; 5], "first guesses: {statuses:?}");
    assert_eq!(&statuses[5..], &[429; 3], "later guesses: {statuses:?}");
    let first_lock = first_lock.unwrap();
    assert!((1..=5).contains(&first_lock), "first lock {first_lock} s");

    // Meanwhile admin, from 127.0.0.1, is served: with its cached
    // credential...
    admin
        .get(vnodes)
        .unwrap()
        .expect_status(&[200], "admin (cached) while the attacker is locked");
    // A password already accepted is not refused even from the locked
    // address (it costs no hashing, so there is nothing to slow down).
    let (status, _, body) = get_as(&attacker, vnodes, ADMIN_USER, ADMIN_PASSWORD);
    assert_eq!(
        status, 200,
        "admin's cached credential from 127.0.0.2: {body}"
    );
    // ...and with a fresh login that needs a full verification (a new
    // password empties the credential cache).
    let new_password = "a-new-admin-password-1";
    admin
        .put_json(
            "/api/v1/user/admin/password",
            &json!({"password": new_password}),
        )
        .unwrap()
        .expect_status(
            &[200],
            "admin changes its password while the attacker is locked",
        );
    let (status, _, body) = get_as(&admin, vnodes, ADMIN_USER, new_password);
    assert_eq!(status, 200, "admin's fresh login from 127.0.0.1: {body}");
    // The attacker is still locked out.
    let (status, _, _) = get_as(&attacker, vnodes, ADMIN_USER, guess);
    assert_eq!(status, 429, "the attacker is still locked");

    // The lock ends; the next wrong guess locks again, for longer.
    let started = Instant::now();
    wait_until(
        "the attacker's first lock to end",
        DEADLINE,
        || match get_as(&attacker, vnodes, ADMIN_USER, guess) {
            (401, _, _) => Ok(()),
            (429, _, _) => Err("still locked".into()),
            (s, _, b) => panic!("unexpected HTTP {s}: {b}"),
        },
    );
    assert!(
        started.elapsed() >= Duration::from_secs(first_lock.saturating_sub(1)),
        "the lock ended early: after {:?}, {first_lock} s announced",
        started.elapsed()
    );
    let (status, retry_after, _) = get_as(&attacker, vnodes, ADMIN_USER, guess);
    assert_eq!(status, 429, "locked again after a failure following a lock");
    let second_lock = retry_after.expect("Retry-After");
    assert!(
        second_lock > first_lock,
        "the lock should grow: {first_lock} s, then {second_lock} s"
    );
    // Admin is still fine from its own address.
    let (status, _, body) = get_as(&admin, vnodes, ADMIN_USER, new_password);
    assert_eq!(status, 200, "admin after the second lock: {body}");
}

/// How many clients flood the node at once.
const FLOOD_CLIENTS: usize = 120;
/// Login attempts per flooding client.
const ATTEMPTS_PER_CLIENT: usize = 5;
/// The node's resident memory may grow by at most this much under the
/// flood. Password hashing runs on a fixed pool of at most 4 workers with
/// 19 MiB of Argon2 memory each (76 MiB), and 120 TLS connections with
/// their tasks take a few MiB; before the pool, every concurrent login
/// allocated its own 19 MiB: 120 of them are over 2 GiB.
const FLOOD_GROWTH_LIMIT_KIB: u64 = 192 * 1024;
/// Once the flood is over, resident memory must come back to within this
/// much of where it was before (the Argon2 memory is kept for reuse, the
/// connections' memory is given back).
const SETTLED_GROWTH_LIMIT_KIB: u64 = 96 * 1024;

#[test]
fn a_flood_of_unknown_logins_keeps_memory_bounded_and_admin_served() {
    let mut node = Node::start();
    let admin = node.api().clone();
    admin
        .get("/api/v1/virtualnode")
        .unwrap()
        .expect_status(&[200], "admin before the flood");
    let pid = node.pid();
    let baseline = rss_kib(pid);

    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(baseline);
    let statuses = Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let admin_latencies = Mutex::new(Vec::new());
    let start = Barrier::new(FLOOD_CLIENTS + 1);
    std::thread::scope(|s| {
        // Samples the node's memory while the flood runs.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let flooders: Vec<_> = (0..FLOOD_CLIENTS)
            .map(|i| {
                let (start, statuses) = (&start, &statuses);
                let base = admin.base().to_string();
                s.spawn(move || {
                    // A client (and connection) of its own.
                    let api = Api::new(base);
                    start.wait();
                    for j in 0..ATTEMPTS_PER_CLIENT {
                        let login = format!("ghost-{i}-{j}");
                        let password = format!("guess-{:016x}", rand::random::<u64>());
                        let (status, retry_after, body) =
                            get_as(&api, "/api/v1/virtualnode", &login, &password);
                        match status {
                            401 | 429 => {}
                            503 => {
                                assert_eq!(body["code"], "AUTH_BUSY", "{body}");
                                assert!(retry_after.is_some(), "a 503 carries Retry-After");
                            }
                            other => panic!("unknown user {login}: HTTP {other}: {body}"),
                        }
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                    }
                })
            })
            .collect();
        start.wait();
        // Admin, whose credential is cached, is served all along.
        while !flooders.iter().all(|f| f.is_finished()) {
            let t = Instant::now();
            admin
                .get("/api/v1/virtualnode")
                .unwrap()
                .expect_status(&[200], "admin during the flood");
            admin_latencies.lock().unwrap().push(t.elapsed());
        }
        for f in flooders {
            f.join().expect("flooding client");
        }
        done.store(true, Ordering::Relaxed);
    });
    node.assert_running();
    let peak = peak.load(Ordering::Relaxed);
    let statuses = statuses.into_inner().unwrap();
    let latencies = admin_latencies.into_inner().unwrap();
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "[e2e] unknown-login flood: baseline {} MiB, peak {} MiB, answers {statuses:?}, \
         {} admin requests, slowest {slowest:?}",
        baseline / 1024,
        peak / 1024,
        latencies.len()
    );
    assert_eq!(
        statuses.values().sum::<usize>(),
        FLOOD_CLIENTS * ATTEMPTS_PER_CLIENT
    );
    assert!(
        !latencies.is_empty(),
        "admin was not served during the flood"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "admin waited {slowest:?} for an answer during the flood"
    );
    assert!(
        peak <= baseline + FLOOD_GROWTH_LIMIT_KIB,
        "resident memory grew from {} MiB to {} MiB under the flood (limit +{} MiB)",
        baseline / 1024,
        peak / 1024,
        FLOOD_GROWTH_LIMIT_KIB / 1024
    );
    wait_until(
        "resident memory to settle after the flood",
        DEADLINE,
        || {
            let now = rss_kib(pid);
            if now <= baseline + SETTLED_GROWTH_LIMIT_KIB {
                Ok(())
            } else {
                Err(format!(
                    "{} MiB, baseline {} MiB",
                    now / 1024,
                    baseline / 1024
                ))
            }
        },
    );
    // Unknown logins are throttled too: the same unknown login, again and
    // again, is refused before its password is checked.
    let other = admin.bound_to("127.0.0.3".parse::<IpAddr>().unwrap());
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(get_as(&other, "/api/v1/virtualnode", "ghost", "guess-password").0);
    }
    assert_eq!(&seen[..5], &[401; 5], "unknown login: {seen:?}");
    assert_eq!(&seen[5..], &[429; 2], "unknown login: {seen:?}");
    let (status, _, body) = get_as(&admin, "/api/v1/virtualnode", ADMIN_USER, ADMIN_PASSWORD);
    assert_eq!(status, 200, "admin after the flood: {body}");
}
