//! The encoding a NATS message's `Content-Type` header selects. NATS keeps a header name's
//! case as sent, and clients write it either way (`content-type`): the name is matched in
//! any case, as docs/protocol.md says.

use async_nats::HeaderMap;
use flowgrid_proto::{Encoding, CONTENT_TYPE_HEADER};

/// The value of a message's `Content-Type` header, whatever the case of its name.
pub fn content_type(headers: Option<&HeaderMap>) -> Option<&str> {
    // One pass over the few headers a message has: most have none of this name (MessagePack).
    headers?
        .iter()
        .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str())
}

/// A message's encoding: JSON when its `Content-Type` says so, else MessagePack.
pub fn encoding_of(headers: Option<&HeaderMap>) -> Encoding {
    Encoding::from_content_type(content_type(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_name_is_matched_in_any_case() {
        for name in ["Content-Type", "content-type", "CONTENT-TYPE"] {
            let mut headers = HeaderMap::new();
            headers.insert(name, "application/json; charset=utf-8");
            assert_eq!(encoding_of(Some(&headers)), Encoding::Json, "{name}");
        }
        let mut other = HeaderMap::new();
        other.insert("Content-Typo", "application/json");
        assert_eq!(encoding_of(Some(&other)), Encoding::MsgPack);
        assert_eq!(encoding_of(None), Encoding::MsgPack);
    }
}
