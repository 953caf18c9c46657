//! A plain UDP forwarder: the least a proxy can do, used by `bench/balancer.sh` as the floor
//! against which the SIP load balancer's CPU per call is measured.
//!
//! One socket faces the client (`--listen`), one faces the server (`--to`). Every datagram
//! that arrives on the client side is sent on to the server as it is; every datagram from the
//! server goes back to the client address last seen. One task per direction on tokio's
//! multi-thread runtime, as the balancer runs; `--single-thread` uses the current-thread one.
//!
//! It does not parse anything, keeps no state beyond that one address, serves one client at a
//! time and has no TCP.
//!
//! ```sh
//! cargo run --release -p thalamus-gateway --example udp_forwarder -- \
//!     --listen 127.0.0.1:5060 --to 127.0.0.1:5070 [--single-thread]
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use tokio::net::UdpSocket;

/// Largest datagram forwarded (the IPv4 UDP payload limit); longer ones are truncated by the
/// kernel.
const MAX_DATAGRAM: usize = 65_507;

/// The command line.
struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    /// Run on tokio's current-thread runtime instead of the multi-thread one.
    single_thread: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut listen = None;
    let mut to = None;
    let mut single_thread = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--single-thread" {
            single_thread = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let addr: SocketAddr = value
            .parse()
            .with_context(|| format!("{flag} {value}: not an IP:port"))?;
        match flag.as_str() {
            "--listen" => listen = Some(addr),
            "--to" => to = Some(addr),
            _ => bail!(
                "unknown argument {flag} (usage: --listen IP:PORT --to IP:PORT [--single-thread])"
            ),
        }
    }
    Ok(Args {
        listen: listen.context("--listen IP:PORT is required")?,
        to: to.context("--to IP:PORT is required")?,
        single_thread,
    })
}

/// The client address last seen, shared by both directions.
type LastClient = Arc<Mutex<Option<SocketAddr>>>;

/// Client -> server: remembers the sender, sends the datagram on.
async fn client_to_server(
    client_side: Arc<UdpSocket>,
    server_side: Arc<UdpSocket>,
    last_client: LastClient,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match client_side.recv_from(&mut buf).await {
            Ok(r) => r,
            // ICMP errors of earlier sends surface here on some systems: not fatal.
            Err(e) => {
                eprintln!("client side receive: {e}");
                continue;
            }
        };
        if let Ok(mut last) = last_client.lock() {
            *last = Some(from);
        }
        let datagram = buf.get(..n).unwrap_or_default();
        if let Err(e) = server_side.send(datagram).await {
            eprintln!("send to server: {e}");
        }
    }
}

/// Server -> client: sends every datagram to the client address last seen.
async fn server_to_client(
    client_side: Arc<UdpSocket>,
    server_side: Arc<UdpSocket>,
    last_client: LastClient,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match server_side.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("server side receive: {e}");
                continue;
            }
        };
        let client = last_client.lock().ok().and_then(|last| *last);
        let Some(client) = client else {
            continue;
        };
        let datagram = buf.get(..n).unwrap_or_default();
        if let Err(e) = client_side.send_to(datagram, client).await {
            eprintln!("send to client {client}: {e}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut runtime = if args.single_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(forward(args))
}

/// Binds both sockets and forwards until Ctrl-C or a task ends.
async fn forward(args: Args) -> anyhow::Result<()> {
    let client_side = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let server_bind: SocketAddr = if args.to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let server_side = UdpSocket::bind(server_bind)
        .await
        .context("binding the server-side socket")?;
    server_side
        .connect(args.to)
        .await
        .with_context(|| format!("connecting to {}", args.to))?;
    eprintln!(
        "forwarding {} -> {} (server side {})",
        client_side.local_addr()?,
        args.to,
        server_side.local_addr()?
    );
    let (client_side, server_side) = (Arc::new(client_side), Arc::new(server_side));
    let last_client = LastClient::default();
    let up = tokio::spawn(client_to_server(
        Arc::clone(&client_side),
        Arc::clone(&server_side),
        Arc::clone(&last_client),
    ));
    let down = tokio::spawn(server_to_client(client_side, server_side, last_client));
    tokio::select! {
        r = up => r.context("client-to-server task")??,
        r = down => r.context("server-to-client task")??,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
