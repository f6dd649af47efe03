//! A package whose `describe` misbehaves, for the host's upload checks.
//! Which way is chosen when it is built, by the environment variable
//! `BRAID_HOSTILE_DESCRIBE`:
//!
//! - `sleep` (the default): Rust std's sleep for a million seconds (a WASI
//!   clock wait) inside `describe`;
//! - `spin`: a busy loop inside `describe`;
//! - `invalid`: a flow list the host must refuse (two flows with one name,
//!   a responder with no versions).
//!
//! It implements the package interface by hand (the SDK's `export_flows!`
//! only ever describes flows correctly).

use std::hint::black_box;

use braid_sdk::__bindings::braid::flow::types::Protocol;
use braid_sdk::__rt::{FlowInfo, Guest, Start};

struct HostileDescribe;

fn flow(name: &str, responds_to: Option<Protocol>) -> FlowInfo {
    FlowInfo {
        name: name.into(),
        startable: responds_to.is_none(),
        initiates: None,
        responds_to,
    }
}

impl Guest for HostileDescribe {
    fn describe() -> Vec<FlowInfo> {
        match option_env!("BRAID_HOSTILE_DESCRIBE").unwrap_or("sleep") {
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "invalid" => vec![
                flow("twice", None),
                flow("twice", None),
                flow(
                    "answers_nothing",
                    Some(Protocol {
                        name: "p".into(),
                        versions: vec![],
                    }),
                ),
            ],
            _ => {
                std::thread::sleep(std::time::Duration::from_secs(1_000_000));
                vec![flow("never", None)]
            }
        }
    }

    fn run(_name: String, _how: Start) -> Result<String, String> {
        Err("this package only misbehaves in describe".into())
    }
}

braid_sdk::__bindings::__export_flow_package!(HostileDescribe);
