//! The durable submits the grid refused, as coordinators keep them
//! ([`flowgrid_proto::Subjects::submit_refused`]).

use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use async_nats::jetstream::Context;
use flowgrid_model::Millis;
use flowgrid_proto::{decode, StartRun, REFUSAL_CODE_HEADER, REFUSAL_HEADER, SUBMIT_SEQUENCE_HEADER};

use crate::error::{Error, Result};
use crate::Client;

/// The most refused submits one call returns.
pub const REFUSED_SUBMITS_MAX: usize = 1_000;

/// A durable submit a coordinator refused, with why.
#[derive(Clone, Debug, PartialEq)]
pub struct RefusedSubmit {
    /// When it was refused (Unix ms).
    pub refused_ms: Millis,
    /// The refusal's error code (`not_found`, `invalid_request`, ...).
    pub code: String,
    /// The refusal's message.
    pub reason: String,
    /// Its sequence in the submit stream.
    pub submit_sequence: Option<u64>,
    /// The request as it was submitted; `None` when it is not a `StartRun` (then
    /// `reason` says why).
    pub request: Option<StartRun>,
}

impl Client {
    /// The last `limit` (at most [`REFUSED_SUBMITS_MAX`]) durable submits the grid refused,
    /// newest first, as long as it keeps them (a week, 64 MiB). Empty when it never
    /// refused one.
    pub async fn refused_submits(&self, limit: usize) -> Result<Vec<RefusedSubmit>> {
        let Some(stream) = refused_stream(self.jetstream(), &self.subjects().submit_refused_stream()).await? else {
            return Ok(Vec::new());
        };
        // Opening the stream read its state.
        let (name, state) = (stream.cached_info().config.name.clone(), stream.cached_info().state.clone());
        let nats =
            |what: &str, error: async_nats::Error| Error::Nats { context: format!("{what} {name}"), source: error };
        let mut refused = Vec::new();
        let mut sequence = state.last_sequence;
        while refused.len() < limit.min(REFUSED_SUBMITS_MAX) && sequence >= state.first_sequence.max(1) {
            match stream.get_raw_message(sequence).await {
                Ok(message) => refused.push(RefusedSubmit::from_message(&message)),
                // Aged out or removed meanwhile.
                Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(error) => return Err(nats("read a message of stream", error.into())),
            }
            sequence -= 1;
        }
        Ok(refused)
    }
}

/// The refused-submits stream, `None` when it does not exist.
async fn refused_stream(jetstream: &Context, name: &str) -> Result<Option<Stream>> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match jetstream.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(source) if source.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
            _ => Err(Error::Nats { context: format!("open stream {name}"), source: error.into() }),
        },
    }
}

impl RefusedSubmit {
    fn from_message(message: &async_nats::jetstream::message::StreamMessage) -> RefusedSubmit {
        let header = |name: &str| message.headers.get(name).map(|value| value.as_str().to_owned());
        let encoding = crate::encoding_of(Some(&message.headers));
        let request = decode::<StartRun>(encoding, &message.payload).ok();
        let refused_ms = u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        RefusedSubmit {
            refused_ms,
            code: header(REFUSAL_CODE_HEADER).unwrap_or_default(),
            reason: header(REFUSAL_HEADER).unwrap_or_default(),
            submit_sequence: header(SUBMIT_SEQUENCE_HEADER).and_then(|text| text.parse().ok()),
            request,
        }
    }
}
