//! What a package may say about itself in `describe`.
//!
//! The list comes from the package's own code, so it is checked before the
//! host believes it: names that RBAC patterns and REST paths can carry,
//! bounded counts, protocols a session can actually be opened under, and no
//! two responders competing for the same protocol version.

use braid_types::{FlowInfo, Protocol};
use std::collections::HashSet;

/// Most flows a package may export.
pub const MAX_FLOWS: usize = 256;
/// Longest flow or protocol name, bytes.
pub const MAX_NAME: usize = 128;
/// Most versions a protocol may list.
pub const MAX_VERSIONS: usize = crate::flow::MAX_VERSIONS;

fn flow_name_ok(n: &str) -> bool {
    (1..=MAX_NAME).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn protocol_name_ok(n: &str) -> bool {
    (1..=MAX_NAME).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
}

fn show(s: &str) -> String {
    format!("{:?}", crate::flow::truncate_str(s, 80))
}

fn check_protocol(flow: &str, role: &str, p: &Protocol) -> Result<(), String> {
    if !protocol_name_ok(&p.name) {
        return Err(format!(
            "flow {} {role} protocol {}: a protocol name must be 1 to {MAX_NAME} characters \
             from A-Z a-z 0-9 . _ - : /",
            show(flow),
            show(&p.name)
        ));
    }
    if p.versions.is_empty() {
        return Err(format!(
            "flow {} {role} protocol {} with no versions; list at least one",
            show(flow),
            show(&p.name)
        ));
    }
    if p.versions.len() > MAX_VERSIONS {
        return Err(format!(
            "flow {} {role} protocol {} with {} versions; at most {MAX_VERSIONS}",
            show(flow),
            show(&p.name),
            p.versions.len()
        ));
    }
    let unique: HashSet<u32> = p.versions.iter().copied().collect();
    if unique.len() != p.versions.len() {
        return Err(format!(
            "flow {} {role} protocol {} lists a version twice",
            show(flow),
            show(&p.name)
        ));
    }
    Ok(())
}

/// Checks a package's `describe` output; the error says what is wrong.
pub fn validate(flows: &[FlowInfo]) -> Result<(), String> {
    if flows.is_empty() {
        return Err("the package exports no flows".into());
    }
    if flows.len() > MAX_FLOWS {
        return Err(format!(
            "the package exports {} flows; at most {MAX_FLOWS}",
            flows.len()
        ));
    }
    let mut names = HashSet::new();
    let mut answered: HashSet<(&str, u32)> = HashSet::new();
    for f in flows {
        if !flow_name_ok(&f.name) {
            return Err(format!(
                "flow name {} is invalid: use 1 to {MAX_NAME} characters from A-Z a-z 0-9 . _ -",
                show(&f.name)
            ));
        }
        if !names.insert(f.name.as_str()) {
            return Err(format!(
                "two flows are named {}; flow names must be unique",
                show(&f.name)
            ));
        }
        if let Some(p) = &f.initiates {
            check_protocol(&f.name, "initiates", p)?;
        }
        if let Some(p) = &f.responds_to {
            check_protocol(&f.name, "answers", p)?;
            for v in &p.versions {
                if !answered.insert((p.name.as_str(), *v)) {
                    return Err(format!(
                        "two responder flows answer protocol {} version {v}; a session-init \
                         must have one responder",
                        show(&p.name)
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(name: &str) -> FlowInfo {
        FlowInfo {
            name: name.into(),
            startable: true,
            initiates: None,
            responds_to: None,
        }
    }

    fn responder(name: &str, protocol: &str, versions: &[u32]) -> FlowInfo {
        FlowInfo {
            name: name.into(),
            startable: false,
            initiates: None,
            responds_to: Some(Protocol {
                name: protocol.into(),
                versions: versions.to_vec(),
            }),
        }
    }

    #[track_caller]
    fn refused(flows: &[FlowInfo], word: &str) {
        let e = validate(flows).unwrap_err();
        assert!(e.contains(word), "{e:?} should mention {word:?}");
    }

    #[test]
    fn good_packages_pass() {
        validate(&[flow("ping"), responder("ping_responder", "ping", &[1, 2])]).unwrap();
        validate(&[flow("a.b-c_9")]).unwrap();
    }

    #[test]
    fn bad_descriptions_are_refused_with_the_reason() {
        refused(&[], "no flows");
        refused(&[flow("")], "invalid");
        refused(&[flow("a:b")], "invalid");
        refused(&[flow("a*")], "invalid");
        refused(&[flow("a b")], "invalid");
        refused(&[flow(&"x".repeat(MAX_NAME + 1))], "invalid");
        refused(&[flow("x"), flow("x")], "unique");
        refused(&[responder("r", "p", &[])], "no versions");
        refused(&[responder("r", "", &[1])], "protocol name");
        refused(&[responder("r", "p q", &[1])], "protocol name");
        refused(&[responder("r", "p", &[1, 1])], "twice");
        let many: Vec<u32> = (0..=MAX_VERSIONS as u32).collect();
        refused(&[responder("r", "p", &many)], "at most");
        refused(
            &[responder("r1", "p", &[1, 2]), responder("r2", "p", &[2, 3])],
            "one responder",
        );
        let lots: Vec<FlowInfo> = (0..=MAX_FLOWS).map(|i| flow(&format!("f{i}"))).collect();
        refused(&lots, "at most");
        let mut init = flow("i");
        init.initiates = Some(Protocol {
            name: "p".into(),
            versions: vec![],
        });
        refused(&[init], "no versions");
    }
}
