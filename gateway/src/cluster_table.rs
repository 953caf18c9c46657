//! The cluster's node table as the SIP load balancers keep it ([`BalancerTable`]: their
//! `GET /nodes`, every node with its state, draining flag and the load its heartbeats report),
//! read for the operator console. It reads over HTTP, bounded in time and size; it does not
//! change anything on the balancers, and nothing but the console waits for it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};

/// How long the console waits for a balancer's node table.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// How long a node table fetched is shown before it is fetched again.
const TABLE_FRESH: Duration = Duration::from_secs(1);
/// Largest node table read from a balancer.
const MAX_TABLE_BYTES: usize = 256 * 1024;

/// The cluster's node table as the balancers keep it (their `GET /nodes`: every node with its
/// state, draining flag and the load its heartbeats report), fetched when a console asks and
/// kept for a second, so any number of consoles cost one fetch a second. Every balancer
/// configured is asked at once; the first in the configuration's order that answers is shown.
pub struct BalancerTable {
    balancers: Vec<SocketAddr>,
    client: Client<HttpConnector, Empty<Bytes>>,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Value)>>,
}

impl std::fmt::Debug for BalancerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancerTable")
            .field("balancers", &self.balancers)
            .finish_non_exhaustive()
    }
}

impl BalancerTable {
    /// A table read from `balancers` (their admin addresses); none: no table.
    pub fn new(balancers: Vec<SocketAddr>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(FETCH_WAIT));
        BalancerTable {
            balancers,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// `{"from": <balancer>, "nodes": [...]}`, `{"error": ...}` when no balancer answered, or
    /// null when none is configured.
    pub(crate) async fn read(&self) -> Value {
        if self.balancers.is_empty() {
            return Value::Null;
        }
        let mut last = self.last.lock().await;
        if let Some((at, table)) = last.as_ref() {
            if at.elapsed() < TABLE_FRESH {
                return table.clone();
            }
        }
        let answers =
            futures::future::join_all(self.balancers.iter().map(|b| self.fetch(*b))).await;
        let mut errors = Vec::new();
        let mut table = None;
        for (balancer, answer) in self.balancers.iter().zip(answers) {
            match answer {
                Ok(nodes) => {
                    table = Some(json!({"from": balancer.to_string(), "nodes": nodes}));
                    break;
                }
                Err(e) => errors.push(format!("{balancer}: {e}")),
            }
        }
        let table = table.unwrap_or_else(|| json!({"error": errors.join("; ")}));
        *last = Some((tokio::time::Instant::now(), table.clone()));
        table
    }

    /// One balancer's `GET /nodes`, within [`FETCH_WAIT`] and [`MAX_TABLE_BYTES`].
    async fn fetch(&self, balancer: SocketAddr) -> Result<Value, String> {
        let uri: axum::http::Uri = format!("http://{balancer}/nodes")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let read = async {
            let response = self.client.get(uri).await.map_err(|e| e.to_string())?;
            if response.status() != StatusCode::OK {
                return Err(format!("status {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_TABLE_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let nodes: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            if nodes.is_array() {
                Ok(nodes)
            } else {
                Err("not a node table".to_string())
            }
        };
        tokio::time::timeout(FETCH_WAIT, read)
            .await
            .map_err(|_| "no answer in time".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A balancer that does not answer: the table says so, naming it, and a second read within
    /// the second is the kept answer (one fetch a second whatever the consoles).
    #[tokio::test]
    async fn an_unreachable_balancer_is_named_and_the_answer_kept() {
        assert_eq!(BalancerTable::new(Vec::new()).read().await, Value::Null);
        // A port nobody listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let table = BalancerTable::new(vec![closed]);
        let first = table.read().await;
        let error = first["error"].as_str().unwrap_or_default().to_string();
        assert!(error.starts_with(&closed.to_string()), "{first}");
        assert!(first.get("nodes").is_none(), "{first}");
        let at = table.last.lock().await.as_ref().map(|(at, _)| *at);
        assert_eq!(table.read().await, first);
        assert_eq!(table.last.lock().await.as_ref().map(|(at, _)| *at), at);
    }

    /// A balancer that answers with something other than a node table is not shown.
    #[tokio::test]
    async fn an_answer_that_is_not_a_node_table_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/nodes",
            axum::routing::get(|| async { axum::Json(json!({"not": "a table"})) }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let table = BalancerTable::new(vec![addr]).read().await;
        assert!(
            table["error"]
                .as_str()
                .is_some_and(|e| e.contains("not a node table")),
            "{table}"
        );
    }
}
