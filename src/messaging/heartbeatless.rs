//! Connections with heartbeats off (`heartbeat_timeout_threshold = 0`).
//!
//! py-amqp answers the broker's `Connection.Tune` with heartbeat 0 when the client asks for
//! none (`amqp/connection.py` `Connection._on_tune`: "Ignore server heartbeat if
//! client_heartbeat is disabled"), and RabbitMQ then neither sends nor expects heartbeats.
//! lapin cannot: asked for none, it adopts the broker's proposal (`Channel::
//! tune_connection_configuration`, in lapin 2.5 as in 4.7). So such a connection runs
//! through a loopback socket of this process, and the broker's `Connection.Tune` reaches
//! lapin with heartbeat 0, which lapin then answers with 0 too. Every other byte passes
//! unchanged; only connections with heartbeats off take this hop.

use std::net::TcpStream as StdTcpStream;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// AMQP frame type of a method frame, and the `Connection.Tune` method (class 10, id 30).
const METHOD_FRAME: u8 = 1;
const CONNECTION_TUNE: [u8; 4] = [0, 10, 0, 30];
/// Offset of `heartbeat` in `Connection.Tune`'s payload: class, method, channel-max (u16),
/// frame-max (u32).
const TUNE_HEARTBEAT: usize = 10;

/// Connects to `host:port` (with TLS when `tls` is given) and returns the loopback end lapin
/// speaks AMQP on; a task of the current runtime passes the bytes between the two.
pub async fn connect(host: &str, port: u16, tls: Option<Arc<ClientConfig>>) -> std::io::Result<StdTcpStream> {
    let broker = TcpStream::connect((host, port)).await?;
    broker.set_nodelay(true)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let lapin_end = TcpStream::connect(listener.local_addr()?).await?;
    let (ours, _) = listener.accept().await?;
    match tls {
        Some(config) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let broker = tokio_rustls::TlsConnector::from(config).connect(name, broker).await?;
            tokio::spawn(relay(ours, broker));
        }
        None => {
            tokio::spawn(relay(ours, broker));
        }
    }
    let lapin_end = lapin_end.into_std()?;
    lapin_end.set_nonblocking(false)?;
    Ok(lapin_end)
}

/// Passes bytes both ways until either side closes, the broker's `Connection.Tune` with
/// heartbeat 0.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(ours: TcpStream, broker: S) {
    let (mut from_broker, mut to_broker) = tokio::io::split(broker);
    let (mut from_lapin, mut to_lapin) = ours.into_split();
    let up = tokio::io::copy(&mut from_lapin, &mut to_broker);
    let down = async {
        tune_without_heartbeat(&mut from_broker, &mut to_lapin).await?;
        tokio::io::copy(&mut from_broker, &mut to_lapin).await
    };
    tokio::select! {
        ended = up => debug!(?ended, "heartbeat-less connection: lapin's side closed"),
        ended = down => debug!(?ended, "heartbeat-less connection: the broker's side closed"),
    }
}

/// Passes the broker's frames up to and including `Connection.Tune`, that one with its
/// heartbeat zeroed.
async fn tune_without_heartbeat<R, W>(from: &mut R, to: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut header = [0u8; 7];
        from.read_exact(&mut header).await?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        // The payload and the frame-end octet.
        let mut rest = vec![0u8; size + 1];
        from.read_exact(&mut rest).await?;
        let tune = header[0] == METHOD_FRAME && rest.len() > TUNE_HEARTBEAT + 2 && rest[..4] == CONNECTION_TUNE;
        if tune {
            rest[TUNE_HEARTBEAT..TUNE_HEARTBEAT + 2].copy_from_slice(&[0, 0]);
        }
        to.write_all(&header).await?;
        to.write_all(&rest).await?;
        if tune {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_broker_s_tune_reaches_lapin_without_heartbeat_and_the_rest_unchanged() {
        let start = [1u8, 0, 0, 0, 0, 0, 4, 0, 10, 0, 10, 0xCE];
        // Tune: channel-max 2047, frame-max 131072, heartbeat 60.
        let tune = [1u8, 0, 0, 0, 0, 0, 12, 0, 10, 0, 30, 0x07, 0xFF, 0, 2, 0, 0, 0, 60, 0xCE];
        let after = [8u8, 0, 0, 0, 0, 0, 0, 0xCE];
        let input: Vec<u8> = [&start[..], &tune, &after].concat();
        let mut out = Vec::new();
        let mut from = &input[..];
        tune_without_heartbeat(&mut from, &mut out).await.unwrap();
        let mut expected_tune = tune;
        expected_tune[17..19].copy_from_slice(&[0, 0]);
        assert_eq!(out, [&start[..], &expected_tune].concat());
        assert_eq!(from, &after[..], "what follows the tune is left to the plain copy");
    }
}
