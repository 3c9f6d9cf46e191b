//! Lingering close for served TCP connections.
//!
//! When a server closes a socket that still holds bytes it has not read (a client's
//! WINDOW_UPDATE or PING ACK sent while the last stream was finishing), the kernel answers with
//! a RST instead of a FIN. The client then fails its next write with EPIPE (or its read with
//! ECONNRESET) and, with it, every stream whose final frames it had not read yet: a drain that
//! let a stream finish would still lose its last message and trailers. So, as web servers do,
//! a connection being closed sends its FIN first, then reads and discards what the peer still
//! sends until the peer closes too (or [`LINGER`] passes), and only then lets go of the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a closing connection waits for its peer to close: enough for a client to read the
/// last frames and hang up, bounded so a silent peer cannot hold a drain.
pub const LINGER: Duration = Duration::from_secs(2);

/// A served connection whose shutdown lingers (see the module docs).
pub struct Lingering {
    inner: TcpStream,
    closing: Closing,
}

enum Closing {
    Open,
    /// FIN sent; discarding the peer's bytes until it closes or the timer fires.
    Draining(Pin<Box<tokio::time::Sleep>>),
    Closed,
}

impl Lingering {
    pub fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            closing: Closing::Open,
        }
    }

    /// Reads and drops the peer's bytes; ready once it has closed (or the socket failed).
    fn poll_peer_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Connected for Lingering {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.closing {
                Closing::Open => {
                    // Sends the FIN after every byte already written.
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.closing = Closing::Draining(Box::pin(tokio::time::sleep(LINGER)));
                }
                Closing::Draining(timer) => {
                    let timed_out = timer.as_mut().poll(cx).is_ready();
                    if !timed_out {
                        ready!(this.poll_peer_closed(cx));
                    }
                    this.closing = Closing::Closed;
                }
                Closing::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const REPLY: &[u8] = b"the last frames of a finished stream";

    /// A server that replies and closes while an unread client message sits in its socket.
    /// `linger` picks the lingering close; the client's read of the reply is returned.
    async fn reply_then_close(linger: bool) -> std::io::Result<Vec<u8>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            // Wait until the client's message has arrived, without reading it.
            stream.readable().await.unwrap();
            let mut stream = super::Lingering::new(stream);
            stream.write_all(REPLY).await.unwrap();
            if linger {
                stream.shutdown().await.unwrap();
            }
            drop(stream);
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"WINDOW_UPDATE").await.unwrap();
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await.map(|_| got);
        // Hanging up ends the server's linger.
        drop(client);
        server.await.unwrap();
        read
    }

    #[tokio::test]
    async fn a_lingering_close_delivers_everything_written_before_it() {
        assert_eq!(reply_then_close(true).await.unwrap(), REPLY);
    }

    /// The failure the lingering close exists for, shown on the same sockets: closing with
    /// unread bytes resets the connection instead of ending it (an HTTP/2 client that writes
    /// before it reads the last frames then fails with EPIPE and drops them).
    #[tokio::test]
    async fn a_plain_close_with_unread_bytes_loses_the_reply() {
        let err = reply_then_close(false).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
