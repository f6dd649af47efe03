//! A sliding replay window over 64-bit sequence numbers (RFC 6479 style,
//! without the block trick: the window is small).

/// How many sequence numbers behind the highest one seen are still accepted.
pub const WINDOW: u64 = 8192;

const WORDS: usize = (WINDOW / 64) as usize;

/// Why a sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before.
    Replayed,
    /// Older than the window: it cannot be told apart from a replay.
    TooOld {
        /// The highest sequence number seen.
        highest: u64,
    },
}

/// Remembers which of the last [`WINDOW`] sequence numbers were seen.
///
/// [`check`](Self::check) before decrypting is cheap; [`accept`](Self::accept)
/// only after the packet authenticated, so forged packets cannot move it.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// The highest sequence number accepted, if any.
    highest: Option<u64>,
    /// Bit `s % WINDOW` is set when `s` (within the window) was accepted.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            highest: None,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Would `seq` be accepted?
    pub fn check(&self, seq: u64) -> Result<(), Refusal> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if seq > highest {
            return Ok(());
        }
        if highest - seq >= WINDOW {
            return Err(Refusal::TooOld { highest });
        }
        if self.bit(seq) {
            Err(Refusal::Replayed)
        } else {
            Ok(())
        }
    }

    /// Record `seq` as seen (call only after it authenticated).
    pub fn accept(&mut self, seq: u64) -> Result<(), Refusal> {
        self.check(seq)?;
        match self.highest {
            Some(highest) if seq <= highest => {}
            Some(highest) if seq - highest < WINDOW => {
                // Clear the bits of the numbers the window slides over.
                for s in highest + 1..=seq {
                    self.set(s, false);
                }
                self.highest = Some(seq);
            }
            _ => {
                self.bits = [0; WORDS];
                self.highest = Some(seq);
            }
        }
        self.set(seq, true);
        Ok(())
    }

    fn bit(&self, seq: u64) -> bool {
        let i = seq % WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, seq: u64, on: bool) {
        let i = seq % WINDOW;
        let word = &mut self.bits[(i / 64) as usize];
        if on {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn replays_and_old_numbers_are_refused() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(0), Err(Refusal::Replayed));
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(Refusal::Replayed));
        let far = WINDOW + 2000;
        assert_eq!(w.accept(far), Ok(()));
        assert_eq!(w.check(5), Err(Refusal::TooOld { highest: far }));
        assert_eq!(w.check(far - WINDOW + 1), Ok(()));
        assert_eq!(w.check(far - WINDOW), Err(Refusal::TooOld { highest: far }));
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.accept(u64::MAX), Err(Refusal::Replayed));
    }

    proptest! {
        /// Against a model: accepted exactly when new and within the window.
        #[test]
        fn matches_a_model(seqs in proptest::collection::vec(0u64..3 * WINDOW, 0..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = HashSet::new();
            let mut highest: Option<u64> = None;
            for s in seqs {
                let fresh = !seen.contains(&s);
                let in_window = highest.is_none_or(|h| s > h || h - s < WINDOW);
                let got = w.accept(s);
                prop_assert_eq!(got.is_ok(), fresh && in_window, "seq {}", s);
                if got.is_ok() {
                    seen.insert(s);
                    highest = Some(highest.map_or(s, |h| h.max(s)));
                }
            }
        }
    }
}
