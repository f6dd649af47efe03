//! The `proposal` example package: a three-party vote.
//!
//! `propose` (protocol "proposal" v1) asks every counterparty to vote on a
//! proposal, then tells each the outcome: commit if all accepted, abort
//! otherwise. Body `{"counterparties": ["<X.500>", ...], "proposal": "<text>"}`,
//! result `{"accepted": bool, "votes": {"<X.500>": bool, ...}}`.
//!
//! The votes are collected in parallel (`receive_all`: as they arrive).
//!
//! It shows both kinds of sub-flow: `ask_vote` is a plain function, so
//! its session uses the caller's protocol ("proposal"); `fetch_receipt` is an
//! `#[initiating_flow]` of its own, so while it runs its session uses
//! "proposal-receipt".
//!
//! `tally` (protocol "proposal-tally" v1, body `{"counterparty": "<X.500>",
//! "items": n}`) sends n messages in a row and returns the numbers its
//! counterparty read, in order: it shows that a session stays ordered when
//! its messages arrive out of order.

use std::collections::BTreeMap;

use braid_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// Request body of `propose`.
#[derive(Debug, Deserialize)]
struct ProposeArgs {
    counterparties: Vec<String>,
    proposal: String,
}

/// Result of `propose`.
#[derive(Debug, Serialize)]
struct Outcome {
    accepted: bool,
    votes: BTreeMap<String, bool>,
}

/// Initiator to voter: what to vote on.
#[derive(Debug, Serialize, Deserialize)]
struct Proposal {
    text: String,
}

/// Voter to initiator.
#[derive(Debug, Serialize, Deserialize)]
struct Vote {
    accept: bool,
}

/// Initiator to voter: the decision.
#[derive(Debug, Serialize, Deserialize)]
enum Decision {
    Commit,
    Abort,
}

/// Asks every counterparty to vote, then sends each the decision.
#[braid_sdk::initiating_flow(protocol = "proposal", version = 1)]
fn propose(args: ProposeArgs) -> braid_sdk::Result<Outcome> {
    if args.counterparties.is_empty() {
        return Err(FlowError::InvalidArguments(
            "`counterparties` must name at least one party".into(),
        ));
    }
    // Everyone gets the proposal first; the votes are taken as they
    // arrive (a slow voter does not hold the others' votes up).
    let mut sessions = Vec::with_capacity(args.counterparties.len());
    for counterparty in &args.counterparties {
        sessions.push(ask_vote(counterparty, &args.proposal)?);
    }
    let mut votes = BTreeMap::new();
    let answers: Vec<braid_sdk::Result<Vote>> =
        receive_all(&sessions.iter().collect::<Vec<&Session>>());
    for (counterparty, vote) in args.counterparties.iter().zip(answers) {
        votes.insert(counterparty.clone(), vote?.accept);
    }
    let accepted = votes.values().all(|&accept| accept);
    let decision = if accepted {
        Decision::Commit
    } else {
        Decision::Abort
    };
    for session in &sessions {
        session.send(&decision)?;
        session.close()?;
    }
    for counterparty in &args.counterparties {
        let receipt = fetch_receipt(ReceiptRequest {
            counterparty: counterparty.clone(),
        })?;
        info!("decision acknowledged by {}", receipt.signer);
    }
    Ok(Outcome { accepted, votes })
}

/// Sub-flow (plain function): opens a session under the caller's protocol
/// and sends the proposal; the vote comes back on the session returned.
fn ask_vote(counterparty: &str, proposal: &str) -> braid_sdk::Result<Session> {
    let session = Session::initiate(counterparty)?;
    session.send(&Proposal {
        text: proposal.to_owned(),
    })?;
    Ok(session)
}

/// Votes: accept unless the proposal contains the word "reject".
#[braid_sdk::responder_flow(protocol = "proposal", version = 1)]
fn vote(session: Session) -> braid_sdk::Result<()> {
    let proposal: Proposal = session.receive()?;
    let accept = !proposal
        .text
        .split(|c: char| !c.is_alphanumeric())
        .any(|word| word.eq_ignore_ascii_case("reject"));
    session.send(&Vote { accept })?;
    let decision: Decision = session.receive()?;
    info!("proposal decided: {decision:?}");
    Ok(())
}

/// Body of `fetch_receipt` (also startable on its own).
#[derive(Debug, Deserialize)]
struct ReceiptRequest {
    counterparty: String,
}

/// Voter to initiator: confirms it has the decision.
#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    signer: String,
}

/// Sub-flow with its own protocol: asks a party for a receipt.
#[braid_sdk::initiating_flow(protocol = "proposal-receipt", version = 1)]
fn fetch_receipt(request: ReceiptRequest) -> braid_sdk::Result<Receipt> {
    let session = Session::initiate(&request.counterparty)?;
    session.send(&())?;
    let receipt: Receipt = session.receive()?;
    session.close()?;
    Ok(receipt)
}

/// Answers a receipt request.
#[braid_sdk::responder_flow(protocol = "proposal-receipt", version = 1)]
fn sign_receipt(session: Session) -> braid_sdk::Result<()> {
    session.receive::<()>()?;
    session.send(&Receipt { signer: whoami() })?;
    Ok(())
}

/// Body of `tally`.
#[derive(Debug, Deserialize)]
struct TallyArgs {
    counterparty: String,
    items: u32,
}

/// Sends `items` numbered messages in a row (one checkpoint, so they travel
/// together and may arrive in any order), then returns what the
/// counterparty received, in the order its flow read them: sessions are
/// ordered, so that is always 0, 1, 2, ...
#[braid_sdk::initiating_flow(protocol = "proposal-tally", version = 1)]
fn tally(args: TallyArgs) -> braid_sdk::Result<Vec<u32>> {
    let session = Session::initiate(&args.counterparty)?;
    session.send(&args.items)?;
    for i in 0..args.items {
        session.send(&i)?;
    }
    let seen: Vec<u32> = session.receive()?;
    Ok(seen)
}

/// Reads the count, then that many numbers, and sends back what it read.
#[braid_sdk::responder_flow(protocol = "proposal-tally", version = 1)]
fn count_items(session: Session) -> braid_sdk::Result<()> {
    let n: u32 = session.receive()?;
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(session.receive::<u32>()?);
    }
    session.send(&seen)?;
    Ok(())
}

braid_sdk::export_flows!(
    propose,
    vote,
    fetch_receipt,
    sign_receipt,
    tally,
    count_items
);
