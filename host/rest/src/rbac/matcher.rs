//! The permission matcher: whether an operation matches a glob, whether a
//! set of permissions allows an operation, and the two questions about
//! whole patterns that the privilege rules ask: does one glob *cover*
//! another (every operation the second matches, the first matches too),
//! and do two globs *intersect* (some operation matches both).
//!
//! Globs are byte strings in which `*` matches any run of bytes (including
//! none) and every other byte matches itself. `*` is ASCII, so a UTF-8
//! pattern never contains it inside a multi-byte character.

use super::{Permission, PermissionType};

/// `DENY` wins; no match means denied.
pub(crate) fn decide<'a>(perms: impl IntoIterator<Item = &'a Permission>, operation: &str) -> bool {
    let mut allowed = false;
    for p in perms {
        if glob(&p.pattern, operation) {
            match p.kind {
                PermissionType::Deny => return false,
                PermissionType::Allow => allowed = true,
            }
        }
    }
    allowed
}

/// Whether `text` matches `pattern` as a whole; `*` matches any run of
/// characters (including none, `/` and spaces). Linear-time greedy match
/// with backtracking to the last star only.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether every operation matching `inner` also matches `outer`.
///
/// `inner` is read as a word in which each `*` is a symbol of its own that
/// only a `*` of `outer` can consume (a literal of `outer` never equals
/// it); `outer` covers `inner` when it matches that word. This is sound:
/// any operation matching `inner` replaces each of those symbols by some
/// text, which the `*` of `outer` that consumed the symbol consumes
/// instead. [`glob`] already treats a text `*` this way (a pattern `*` is
/// always a wildcard, so a literal never meets a text `*`), so it is the
/// test. It may say "no" for an exotic pair whose languages are in fact
/// nested; refusing is the safe answer there.
pub(crate) fn covers(outer: &str, inner: &str) -> bool {
    glob(outer, inner)
}

/// Whether some operation matches both `a` and `b`: reachability of the
/// accepting state in the product of their automata. A state is a pair
/// of positions; a `*` may match nothing (step past it) or consume the
/// other side's next byte (stay); two equal literals step together.
/// Exact, in O(|a|·|b|) time and space.
pub(crate) fn intersects(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let width = b.len() + 1;
    let mut seen = vec![false; (a.len() + 1) * width];
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        let k = i * width + j;
        if seen[k] {
            continue;
        }
        seen[k] = true;
        if i == a.len() && j == b.len() {
            return true;
        }
        let (sa, sb) = (a.get(i) == Some(&b'*'), b.get(j) == Some(&b'*'));
        if sa {
            stack.push((i + 1, j));
            if j < b.len() {
                // a's star consumes b's literal, or whatever b's star does.
                stack.push((i, j + 1));
            }
        }
        if sb {
            stack.push((i, j + 1));
            if i < a.len() {
                stack.push((i + 1, j));
            }
        }
        if !sa && !sb && i < a.len() && j < b.len() && a[i] == b[j] {
            stack.push((i + 1, j + 1));
        }
    }
    false
}

/// Why a set of permissions does not hold a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lack {
    /// No single `ALLOW` pattern covers it.
    NotCovered,
    /// This `DENY` pattern overlaps it.
    Denied(String),
}

/// Whether `perms` *hold* `pattern`: every operation matching it is
/// allowed. That is: some `ALLOW` covers it and no `DENY` intersects it
/// (conservative: a pattern covered only by several `ALLOW`s together is
/// not held).
pub(crate) fn holds<'a>(
    perms: impl IntoIterator<Item = &'a Permission> + Clone,
    pattern: &str,
) -> Result<(), Lack> {
    let denied = perms
        .clone()
        .into_iter()
        .filter(|p| p.kind == PermissionType::Deny)
        .find(|p| intersects(&p.pattern, pattern));
    if let Some(d) = denied {
        return Err(Lack::Denied(d.pattern.clone()));
    }
    let covered = perms
        .into_iter()
        .any(|p| p.kind == PermissionType::Allow && covers(&p.pattern, pattern));
    if covered {
        Ok(())
    } else {
        Err(Lack::NotCovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PermissionType::{Allow, Deny};
    use proptest::prelude::*;

    fn p(kind: PermissionType, pattern: &str) -> Permission {
        Permission {
            kind,
            pattern: pattern.into(),
        }
    }

    #[test]
    fn globs_match_whole_operations() {
        assert!(glob("*", ""));
        assert!(glob("*", "GET /api/v1/flow/x"));
        assert!(glob("GET /api/v1/*", "GET /api/v1/flow/abc/def"));
        assert!(!glob("GET /api/v1/*", "POST /api/v1/flow/abc"));
        assert!(glob("* /api/v1/user", "DELETE /api/v1/user"));
        assert!(!glob("* /api/v1/user", "DELETE /api/v1/user/bob"));
        assert!(glob("GET /api/v1/flow/*/r1", "GET /api/v1/flow/abc/r1"));
        assert!(!glob("GET /api/v1/flow/*/r1", "GET /api/v1/flow/abc/r12"));
        assert!(glob("a*b*c", "aXXbYYbZc"));
        assert!(!glob("a*b*c", "aXXbYYbZ"));
        assert!(glob("flow:start:*:ping", "flow:start:0123456789ab:ping"));
        assert!(!glob(
            "flow:start:*:ping",
            "flow:start:0123456789ab:pingpong"
        ));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("exactly", "exact"));
        assert!(glob("**", "x"));
    }

    #[test]
    fn deny_wins_and_no_match_denies() {
        let perms = [
            p(Allow, "GET /api/v1/*"),
            p(Deny, "GET /api/v1/flow/bbbbbbbbbbbb*"),
        ];
        assert!(decide(&perms, "GET /api/v1/flow/aaaaaaaaaaaa"));
        assert!(!decide(&perms, "GET /api/v1/flow/bbbbbbbbbbbb"));
        assert!(!decide(&perms, "GET /api/v1/flow/bbbbbbbbbbbb/r1"));
        assert!(!decide(&perms, "POST /api/v1/flow/aaaaaaaaaaaa"));
        assert!(!decide(&[], "GET /api/v1/health"));
        // Order does not matter.
        let reversed = [perms[1].clone(), perms[0].clone()];
        assert!(!decide(&reversed, "GET /api/v1/flow/bbbbbbbbbbbb"));
        assert!(decide(&reversed, "GET /api/v1/package"));
    }

    #[test]
    fn coverage_of_examples() {
        let yes = [
            ("*", "*"),
            ("*", "GET /x"),
            ("*", ""),
            ("* /api/v1/user/*", "PUT /api/v1/user/*"),
            ("* /api/v1/user/*", "* /api/v1/user/*/x"),
            ("* /api/v1/user/*", "GET /api/v1/user/*/*x*"),
            ("GET /api/v1/*", "GET /api/v1/flow/*/r1"),
            ("a*", "a**"),
            ("**", "*"),
            ("*a*", "*a*a*"),
        ];
        for (outer, inner) in yes {
            assert!(covers(outer, inner), "{outer:?} covers {inner:?}");
        }
        let no = [
            ("* /api/v1/user/*", "* /api/v1/user*"),
            ("* /api/v1/user/*", "*/api/v1/user/*"),
            ("* /api/v1/user/*", "* /api/v1/*"),
            ("* /api/v1/user/*", "*"),
            ("GET /api/v1/*", "* /api/v1/x"),
            ("a*", "*a"),
            ("x", "*"),
            ("", "*"),
        ];
        for (outer, inner) in no {
            assert!(!covers(outer, inner), "{outer:?} does not cover {inner:?}");
        }
    }

    #[test]
    fn intersection_of_examples() {
        let yes = [
            ("*", "anything"),
            ("* /api/v1/role", "* /api/v1/role/*"),
            ("DELETE /api/v1/user/*", "* /api/v1/user/*"),
            ("a*", "*b"),
            ("*", ""),
            ("", ""),
            ("a*c", "ab*"),
        ];
        for (a, b) in yes {
            assert!(intersects(a, b), "{a:?} meets {b:?}");
            assert!(intersects(b, a), "{b:?} meets {a:?}");
        }
        let no = [
            ("GET *", "POST *"),
            ("a*", "b*"),
            ("*a", "*b"),
            ("DELETE /api/v1/role/*/permission/x", "GET /api/v1/user/*"),
            ("abc", "abd"),
            ("a", ""),
            ("a*b", "a"),
        ];
        for (a, b) in no {
            assert!(!intersects(a, b), "{a:?} misses {b:?}");
            assert!(!intersects(b, a), "{b:?} misses {a:?}");
        }
    }

    #[test]
    fn holding_needs_one_covering_allow_and_no_overlapping_deny() {
        let ua = [
            p(Allow, "* /api/v1/user"),
            p(Allow, "* /api/v1/user/*"),
            p(Allow, "* /api/v1/role/*"),
            p(Deny, "DELETE /api/v1/role/*"),
        ];
        assert_eq!(holds(&ua, "PUT /api/v1/user/*"), Ok(()));
        assert_eq!(holds(&ua, "GET *"), Err(Lack::NotCovered));
        assert_eq!(
            holds(&ua, "*"),
            Err(Lack::Denied("DELETE /api/v1/role/*".into()))
        );
        assert_eq!(
            holds(&ua, "* /api/v1/role/*"),
            Err(Lack::Denied("DELETE /api/v1/role/*".into()))
        );
        assert_eq!(holds(&ua, "GET /api/v1/role/*"), Ok(()));
        // Covered only by two ALLOWs together: not held (conservative).
        assert_eq!(holds(&ua[..2], "* /api/v1/user*"), Err(Lack::NotCovered));
        // A DENY may overlap a pattern far from where it looks: both match
        // "X /api/v1/role/ /api/v1/user".
        assert_eq!(
            holds(&ua, "* /api/v1/user*"),
            Err(Lack::Denied("DELETE /api/v1/role/*".into()))
        );
        assert_eq!(holds(&[], "x"), Err(Lack::NotCovered));
    }

    /// Small alphabet, so that random globs and texts meet often.
    fn glob_str() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just('a'), Just('b'), Just('*')], 0..7)
            .prop_map(|v| v.into_iter().collect())
    }
    fn text_str() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just('a'), Just('b')], 0..9)
            .prop_map(|v| v.into_iter().collect())
    }

    /// Every text over {a, b} up to `len` bytes.
    fn all_texts(len: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..len {
            let next: Vec<String> = last
                .iter()
                .flat_map(|t| [format!("{t}a"), format!("{t}b")])
                .collect();
            out.extend(next.iter().cloned());
            last = next;
        }
        out
    }

    /// The obvious backtracking matcher, as a reference.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in glob_str(), t in text_str()) {
            prop_assert_eq!(glob(&p, &t), reference(p.as_bytes(), t.as_bytes()));
        }

        /// Soundness: when `outer` covers `inner`, every sample text
        /// `inner` matches, `outer` matches too.
        #[test]
        fn coverage_is_sound(outer in glob_str(), inner in glob_str(), t in text_str()) {
            if covers(&outer, &inner) && glob(&inner, &t) {
                prop_assert!(glob(&outer, &t), "{outer:?} covers {inner:?} but misses {t:?}");
            }
        }

        /// Exactness on samples: globs of at most 6 bytes that intersect
        /// share a text of at most 12 bytes; those that do not, share none.
        #[test]
        fn intersection_is_exact(a in glob_str(), b in glob_str()) {
            let shared = all_texts(12).into_iter().find(|t| glob(&a, t) && glob(&b, t));
            prop_assert_eq!(intersects(&a, &b), shared.is_some(), "{:?} {:?} {:?}", a, b, shared);
        }

        /// Holding is sound: when the permissions hold a pattern, they
        /// allow every sample operation it matches.
        #[test]
        fn holding_is_sound(
            allows in proptest::collection::vec(glob_str(), 0..3),
            denies in proptest::collection::vec(glob_str(), 0..2),
            pattern in glob_str(),
            t in text_str(),
        ) {
            let perms: Vec<Permission> = allows.iter().map(|a| p(Allow, a))
                .chain(denies.iter().map(|d| p(Deny, d)))
                .collect();
            if holds(&perms, &pattern).is_ok() && glob(&pattern, &t) {
                prop_assert!(decide(&perms, &t), "{perms:?} hold {pattern:?} but refuse {t:?}");
            }
        }
    }
}
