//! One simulated device's MBFP connection: QUIC connect, the control stream, framing, and the
//! `Hello`/`Welcome` exchange. Split into a reader and a writer so callers can wait on frames
//! and send at once. Decides nothing: the commands in `connect` (and the load mode) do.

use std::net::SocketAddr;

use bytes::BytesMut;
use thalamus_proto::v1::{envelope::Body, Envelope, Hello, Welcome};
use thalamus_proto::{encode_frame, FrameDecoder, FrameError, DEFAULT_MAX_FRAME_BYTES};
use tokio::io::AsyncReadExt;

/// Connection-level errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The QUIC connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing the control stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the control stream failed.
    #[error("read: {0}")]
    Read(#[from] std::io::Error),
    /// A frame from the gateway did not decode.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// The gateway finished the control stream.
    #[error("the gateway closed the control stream")]
    StreamClosed,
    /// The gateway answered `Hello` with something other than `Welcome`.
    #[error("hello refused: {0:?}")]
    Refused(Box<Envelope>),
}

impl DeviceError {
    /// The QUIC application close code, when the gateway closed the connection with one.
    pub fn close_code(&self) -> Option<u64> {
        match self {
            DeviceError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(c.error_code.into_inner())
            }
            _ => None,
        }
    }
}

/// Reads frames from the control stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    conn: quinn::Connection,
}

impl FrameReader {
    /// The next frame from the gateway.
    pub async fn next(&mut self) -> Result<Envelope, DeviceError> {
        loop {
            if let Some(env) = self.decoder.decode(&mut self.buf)? {
                return Ok(env);
            }
            match self.recv.read_buf(&mut self.buf).await {
                Ok(0) => {
                    // Prefer the connection's close reason when there is one.
                    if let Some(reason) = self.conn.close_reason() {
                        return Err(reason.into());
                    }
                    return Err(DeviceError::StreamClosed);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(reason) = self.conn.close_reason() {
                        return Err(reason.into());
                    }
                    return Err(e.into());
                }
            }
        }
    }
}

/// Writes frames to the control stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    next_request_id: u64,
    buf: BytesMut,
}

impl FrameWriter {
    /// Sends `body` with a fresh request id; returns the id.
    pub async fn send(&mut self, body: Body) -> Result<u64, DeviceError> {
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.send_envelope(&Envelope {
            request_id: id,
            body: Some(body),
        })
        .await?;
        Ok(id)
    }

    /// Sends one envelope as is.
    pub async fn send_envelope(&mut self, env: &Envelope) -> Result<(), DeviceError> {
        self.buf.clear();
        encode_frame(env, DEFAULT_MAX_FRAME_BYTES * 256, &mut self.buf)?;
        self.send.write_all(&self.buf).await?;
        Ok(())
    }

    /// Sends raw bytes on the control stream (for tests of the gateway's error handling).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }
}

/// An open MBFP connection.
#[derive(Debug)]
pub struct DeviceConnection {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Frame reader.
    pub reader: FrameReader,
    /// Frame writer.
    pub writer: FrameWriter,
}

impl DeviceConnection {
    /// Connects to `gateway` and opens the control stream.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        server_name: &str,
    ) -> Result<Self, DeviceError> {
        let conn = endpoint.connect(gateway, server_name)?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            reader: FrameReader {
                recv,
                buf: BytesMut::with_capacity(4096),
                decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES * 16),
                conn: conn.clone(),
            },
            writer: FrameWriter {
                send,
                next_request_id: 0,
                buf: BytesMut::with_capacity(1024),
            },
            conn,
        })
    }

    /// Sends `Hello` and waits for the answer: `Welcome`, or `DeviceError::Refused` with the
    /// gateway's `Error` or `Redirect`.
    pub async fn hello(&mut self, hello: Hello) -> Result<Welcome, DeviceError> {
        let id = self.writer.send(Body::Hello(hello)).await?;
        loop {
            let env = self.reader.next().await?;
            match env.body {
                Some(Body::Welcome(w)) if env.request_id == id => return Ok(w),
                Some(Body::Ping(_)) => {}
                _ => return Err(DeviceError::Refused(Box::new(env))),
            }
        }
    }
}
