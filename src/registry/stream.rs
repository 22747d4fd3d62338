//! Stream plumbing for blob uploads: even upload pieces, and download read-ahead.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use oci_client::errors::OciDistributionError;

/// Gathers small stream items into pieces of `size` bytes (the last may be shorter). Each piece
/// is its own allocation of exactly `size`, so a piece held by an upload pins nothing else.
pub(super) fn rechunk<S>(
    stream: S,
    size: usize,
) -> impl Stream<Item = Result<Bytes, OciDistributionError>> + Send
where
    S: Stream<Item = Result<Bytes, OciDistributionError>> + Send + Unpin,
{
    struct State<S> {
        stream: S,
        leftover: Bytes,
        done: bool,
    }
    let start = State {
        stream,
        leftover: Bytes::new(),
        done: false,
    };
    futures::stream::unfold(start, move |mut st| async move {
        if st.done {
            return None;
        }
        let mut buf = BytesMut::with_capacity(size);
        loop {
            if !st.leftover.is_empty() {
                let take = (size - buf.len()).min(st.leftover.len());
                buf.extend_from_slice(&st.leftover.split_to(take));
            }
            if buf.len() == size {
                return Some((Ok(buf.freeze()), st));
            }
            match st.stream.next().await {
                Some(Ok(piece)) => st.leftover = piece,
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    return (!buf.is_empty()).then(|| (Ok(buf.freeze()), st));
                }
            }
        }
    })
}

/// Keeps up to `depth` items of `stream` fetched ahead, so the download goes on while each
/// upload piece is sent (oci-client sends a piece, waits for the answer, then reads on).
pub(super) fn read_ahead<S, T>(stream: S, depth: usize) -> impl Stream<Item = T> + Send + 'static
where
    S: Stream<Item = T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(depth);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            // The uploader stopped (failed or finished): stop reading.
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    #[test]
    fn rechunk_makes_even_pieces() {
        let items: Vec<Result<Bytes, OciDistributionError>> =
            (0..10).map(|i| Ok(Bytes::from(vec![i as u8; 3]))).collect();
        let out: Vec<Bytes> =
            futures::executor::block_on(rechunk(futures::stream::iter(items), 7).try_collect())
                .unwrap();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, vec![7, 7, 7, 7, 2]);
        let joined: Vec<u8> = out.concat();
        assert_eq!(joined.len(), 30);
        assert_eq!(joined[3], 1);
    }
}
