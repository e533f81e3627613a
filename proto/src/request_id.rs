//! The request id that ties one request's log lines together across processes.
//!
//! The coordinator takes the id a client sent in the `x-shardseal-request-id` metadata
//! (when it is a short, printable token) or uses the request's own id, logs it in its
//! request span, and passes it to every function it calls in the same metadata; each
//! function logs it in its span. It is an identifier chosen for correlation, never
//! derived from a key or a tensor.

use tonic::metadata::{MetadataMap, MetadataValue};

/// The gRPC metadata key that carries the request id.
pub const HEADER: &str = "x-shardseal-request-id";

/// The longest request id accepted from a peer.
pub const MAX_LEN: usize = 64;

tokio::task_local! {
    static CURRENT: String;
}

/// The request id in `metadata`, if it is 1 to [`MAX_LEN`] characters of `[A-Za-z0-9._:-]`
/// (anything else is ignored, so a peer cannot forge log lines or flood labels).
pub fn from_metadata(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get(HEADER)?.to_str().ok()?;
    is_valid(value).then(|| value.to_owned())
}

/// Whether `id` is an acceptable request id.
pub fn is_valid(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Runs `future` with `id` as the current request id (read by [`attach`]).
pub async fn scope<F: Future>(id: String, future: F) -> F::Output {
    CURRENT.scope(id, future).await
}

/// The current task's request id, inside [`scope`].
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Adds the current request id, if any, to an outgoing call's metadata.
pub fn attach<T>(request: &mut tonic::Request<T>) {
    if let Some(id) = current()
        && let Ok(value) = MetadataValue::try_from(id.as_str())
    {
        request.metadata_mut().insert(HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_printable_ids_are_taken_from_peers() {
        let mut m = MetadataMap::new();
        assert_eq!(from_metadata(&m), None);
        m.insert(HEADER, "abc-123_x.y:z".parse().unwrap());
        assert_eq!(from_metadata(&m).as_deref(), Some("abc-123_x.y:z"));
        m.insert(HEADER, "has space".parse().unwrap());
        assert_eq!(from_metadata(&m), None);
        m.insert(HEADER, "a".repeat(65).parse().unwrap());
        assert_eq!(from_metadata(&m), None);
    }

    #[tokio::test]
    async fn the_scoped_id_is_attached_to_outgoing_calls() {
        let mut outside = tonic::Request::new(());
        attach(&mut outside);
        assert!(outside.metadata().get(HEADER).is_none());
        let request = scope("r-1".to_owned(), async {
            let mut request = tonic::Request::new(());
            attach(&mut request);
            request
        })
        .await;
        assert_eq!(request.metadata().get(HEADER).unwrap(), "r-1");
    }
}
