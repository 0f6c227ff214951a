//! Actions: one step of one device's list, printed and parsed as `2F0`, `1B3`, `3SEND_F1`.
//!
//! # Letters
//!
//! cleave's letters follow its own F/B/W split (see `split-bw`), which differs from PyTorch's
//! pipelining IR in one letter:
//!
//! | cleave | meaning | PyTorch `_ComputationType` |
//! |---|---|---|
//! | `F` | forward | `F` (FORWARD) |
//! | `B` | input gradient only (dgrad) | `I` (BACKWARD_INPUT) |
//! | `W` | weight gradient only (wgrad) | `W` (BACKWARD_WEIGHT) |
//! | `BW` | unsplit backward (dgrad + wgrad) | `B` (FULL_BACKWARD) |
//!
//! [`Action::parse`] reads cleave's letters and accepts `I` as an alias of `B`, so PyTorch
//! schedules without a full backward read the same in both conventions. A PyTorch schedule that
//! uses `B` for a full backward must be read with [`Action::parse_pytorch`] (`B` → [`ActionKind::BW`],
//! `I` → [`ActionKind::B`]); [`Action::to_pytorch`] prints PyTorch's letters.
//!
//! Communication and memory actions (`SEND_F`, `RECV_F`, `SEND_B`, `RECV_B`, `OFFLOAD`,
//! `RELOAD`) print like compute actions; `OPT` (the optimizer step of a stage) has no microbatch
//! and prints as `0OPT`.

use std::fmt;

/// What an action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionKind {
    /// Forward.
    F,
    /// Input gradient (dgrad) only.
    B,
    /// Weight gradient (wgrad) only.
    W,
    /// Unsplit backward: B and W together.
    BW,
    /// Send the forward activation to the next stage.
    SendF,
    /// Receive the forward activation from the previous stage.
    RecvF,
    /// Send the input gradient to the previous stage.
    SendB,
    /// Receive the output gradient from the next stage.
    RecvB,
    /// Move a microbatch's stash to host memory.
    Offload,
    /// Bring an offloaded stash back.
    Reload,
    /// The optimizer step of a stage (no microbatch).
    Opt,
}

impl ActionKind {
    /// Every kind, longest name first where one name is a prefix of another (the parser's order).
    const PARSE_ORDER: [(&'static str, ActionKind); 11] = [
        ("SEND_F", ActionKind::SendF),
        ("RECV_F", ActionKind::RecvF),
        ("SEND_B", ActionKind::SendB),
        ("RECV_B", ActionKind::RecvB),
        ("OFFLOAD", ActionKind::Offload),
        ("RELOAD", ActionKind::Reload),
        ("OPT", ActionKind::Opt),
        ("BW", ActionKind::BW),
        ("F", ActionKind::F),
        ("B", ActionKind::B),
        ("W", ActionKind::W),
    ];

    /// The name printed between the stage and the microbatch.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::F => "F",
            ActionKind::B => "B",
            ActionKind::W => "W",
            ActionKind::BW => "BW",
            ActionKind::SendF => "SEND_F",
            ActionKind::RecvF => "RECV_F",
            ActionKind::SendB => "SEND_B",
            ActionKind::RecvB => "RECV_B",
            ActionKind::Offload => "OFFLOAD",
            ActionKind::Reload => "RELOAD",
            ActionKind::Opt => "OPT",
        }
    }

    /// F, B, W or BW: the actions that take compute time and that the validator counts.
    pub fn is_compute(self) -> bool {
        matches!(
            self,
            ActionKind::F | ActionKind::B | ActionKind::W | ActionKind::BW
        )
    }
}

/// One step of a device's list: `kind` of `stage` on `microbatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    /// The (global) stage index; with several chunks per device, stages number the chunks.
    pub stage: u32,
    /// What the action does.
    pub kind: ActionKind,
    /// The microbatch (0 for [`ActionKind::Opt`]).
    pub microbatch: u32,
}

impl Action {
    /// An action.
    pub fn new(stage: u32, kind: ActionKind, microbatch: u32) -> Self {
        Action {
            stage,
            kind,
            microbatch,
        }
    }

    /// Parses cleave's letters (`I` is accepted as an alias of `B`).
    pub fn parse(text: &str) -> Result<Action, ActionParseError> {
        parse_with(text, false)
    }

    /// Parses PyTorch's letters: `B` is a full backward ([`ActionKind::BW`]), `I` an input
    /// gradient ([`ActionKind::B`]).
    pub fn parse_pytorch(text: &str) -> Result<Action, ActionParseError> {
        parse_with(text, true)
    }

    /// Prints with PyTorch's letters (`B` → `I`, `BW` → `B`).
    pub fn to_pytorch(&self) -> String {
        let letter = match self.kind {
            ActionKind::B => "I",
            ActionKind::BW => "B",
            other => other.name(),
        };
        if self.kind == ActionKind::Opt {
            format!("{}{letter}", self.stage)
        } else {
            format!("{}{letter}{}", self.stage, self.microbatch)
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == ActionKind::Opt {
            write!(f, "{}{}", self.stage, self.kind.name())
        } else {
            write!(f, "{}{}{}", self.stage, self.kind.name(), self.microbatch)
        }
    }
}

impl std::str::FromStr for Action {
    type Err = ActionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::parse(s)
    }
}

/// An action string that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad action `{text}`: {reason}")]
pub struct ActionParseError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn parse_with(text: &str, pytorch: bool) -> Result<Action, ActionParseError> {
    let err = |reason| ActionParseError {
        text: text.to_string(),
        reason,
    };
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(err("expected a stage number first"));
    }
    let stage: u32 = t[..digits]
        .parse()
        .map_err(|_| err("stage number too large"))?;
    let rest = &t[digits..];
    let pytorch_b = rest
        .strip_prefix('B')
        .filter(|_| pytorch && !rest.starts_with("BW"));
    let (kind, tail) = if let Some(tail) = pytorch_b {
        (ActionKind::BW, tail)
    } else if let Some(tail) = rest.strip_prefix('I') {
        (ActionKind::B, tail)
    } else {
        ActionKind::PARSE_ORDER
            .iter()
            .find_map(|&(name, kind)| rest.strip_prefix(name).map(|tail| (kind, tail)))
            .ok_or_else(|| err("expected F, B, I, W, BW, SEND_F, RECV_F, SEND_B, RECV_B, OFFLOAD, RELOAD or OPT after the stage"))?
    };
    if kind == ActionKind::Opt {
        if !tail.is_empty() {
            return Err(err("OPT takes no microbatch"));
        }
        return Ok(Action::new(stage, kind, 0));
    }
    if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a microbatch number last"));
    }
    let microbatch = tail
        .parse()
        .map_err(|_| err("microbatch number too large"))?;
    Ok(Action::new(stage, kind, microbatch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_parse_round_trip() {
        for s in [
            "2F0",
            "1B3",
            "0W2",
            "3BW1",
            "3SEND_F1",
            "2RECV_B0",
            "0OFFLOAD4",
            "1RELOAD4",
            "0OPT",
            "12F345",
        ] {
            let a = Action::parse(s).unwrap();
            assert_eq!(a.to_string(), s);
        }
    }

    #[test]
    fn letters_of_both_conventions() {
        assert_eq!(Action::parse("1I3").unwrap().to_string(), "1B3");
        assert_eq!(Action::parse_pytorch("1I3").unwrap().to_string(), "1B3");
        assert_eq!(Action::parse_pytorch("1B3").unwrap().to_string(), "1BW3");
        assert_eq!(Action::parse("1BW3").unwrap().to_pytorch(), "1B3");
        assert_eq!(Action::parse("1B3").unwrap().to_pytorch(), "1I3");
    }

    #[test]
    fn rejects_malformed_strings() {
        for s in ["", "F0", "1X0", "1F", "1Fx", "0OPT3", "1F-1"] {
            assert!(Action::parse(s).is_err(), "{s}");
        }
    }
}
