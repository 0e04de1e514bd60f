//! Why a document failed: a bounded set of reasons (metrics labels) plus the human message.

use serde::{Deserialize, Serialize};

/// Failure class. The set is closed so it can be a metrics label and an alert condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The file could not be parsed (damaged or hostile structure).
    Parse,
    /// The format is not one deltadoc reads, or a codec inside it is not supported.
    Unsupported,
    /// Encrypted with a password that is not empty.
    Encrypted,
    /// Over a configured size, page or memory limit.
    TooLarge,
    /// An attempt ran past its time limit.
    Timeout,
    /// Image pages could not be transcribed.
    Ocr,
    /// The document did not fit and could not be chunked without losing text.
    Truncated,
    /// The model failed.
    Model,
    /// Reading the source or writing the result failed.
    Io,
    /// The daemon died under the document `max_attempts` times in a row at the same place
    /// (`daemon/crash_marker.rs`): the document is taken to be what brings it down.
    Crashed,
}

impl Reason {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Parse => "parse",
            Reason::Unsupported => "unsupported",
            Reason::Encrypted => "encrypted",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
            Reason::Ocr => "ocr",
            Reason::Truncated => "truncated",
            Reason::Model => "model",
            Reason::Io => "io",
            Reason::Crashed => "crashed",
        }
    }

    /// Retrying cannot change the outcome: quarantine at once instead of backing off.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Reason::Unsupported
                | Reason::Encrypted
                | Reason::TooLarge
                | Reason::Parse
                | Reason::Ocr
                | Reason::Truncated
                | Reason::Crashed
        )
    }
}

/// A failed attempt: reason, the stage it happened in, and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{stage}: {reason:?}: {message}")]
pub struct Failure {
    /// Its class (a metrics label).
    pub reason: Reason,
    /// Stage name (`detect`, `extract`, `chunk`, a model stage's name, `write`).
    pub stage: String,
    /// Human explanation naming the file and the cause.
    pub message: String,
}

impl Failure {
    /// A failure in `stage`.
    pub fn new(reason: Reason, stage: impl Into<String>, message: impl Into<String>) -> Self {
        Self { reason, stage: stage.into(), message: message.into() }
    }

    /// The message and the reason, as the commands print a document that failed.
    pub fn brief(&self) -> String {
        format!("{} ({})", self.message, self.reason.name())
    }
}
