//! Support for Lockstep's end-to-end tests: a real broker on `127.0.0.1:0` with a temporary data
//! directory, spoken to over HTTP.

use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_broker::{Broker, Config};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A broker serving on an ephemeral port, stopped (gracefully) by [`TestBroker::stop`].
pub struct TestBroker {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The data directory; kept so the broker can be restarted on the same log.
    pub dir: TempDir,
    /// The broker itself, for what only the broker may do (e.g. append control records).
    /// Dropped before the broker stops, since `serve` waits for every handle to go.
    pub broker: Option<Broker>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestBroker {
    /// Starts a broker with default settings on a new temporary directory.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker on a new temporary directory, after `configure` adjusts its settings.
    ///
    /// Automatic barriers are off unless `configure` turns them on, so that tests can count the
    /// events they publish; `TestBroker::barrier` appends one on demand.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = quiet(Config::with_data_dir(dir.path()));
        configure(&mut config);
        Self::start_in(dir, config).await
    }

    async fn start_in(dir: TempDir, config: Config) -> Self {
        let broker = Broker::open(config).expect("open broker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(dir, broker, listener)
    }

    /// Serves `broker` on `listener` until [`TestBroker::stop`].
    fn serve(dir: TempDir, broker: Broker, listener: tokio::net::TcpListener) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel();
        let handle = broker.clone();
        let task = tokio::spawn(lockstep_broker::serve(listener, broker, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            dir,
            broker: Some(handle),
            stop,
            task,
        }
    }

    /// Stops the broker gracefully and returns its data directory.
    pub async fn stop(mut self) -> TempDir {
        drop(self.broker.take());
        let _ = self.stop.send(());
        self.task
            .await
            .expect("broker task")
            .expect("broker served");
        self.dir
    }

    /// Stops the broker and starts a new one on the same data directory.
    pub async fn restart(self) -> Self {
        let dir = self.stop().await;
        let config = quiet(Config::with_data_dir(dir.path()));
        Self::start_in(dir, config).await
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `self.url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// `config` without automatic barriers.
fn quiet(mut config: Config) -> Config {
    config.barrier_every = 0;
    config.barrier_interval_ms = 0;
    config
}

/// Polls `condition` every 10 ms until it holds, failing the test after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Small HTTP helpers shared by the end-to-end tests.
impl TestBroker {
    /// `GET /v1/head`, decoded.
    pub async fn head(&self) -> lockstep_proto::wire::Head {
        let response = reqwest::get(self.at("/v1/head"))
            .await
            .expect("GET /v1/head");
        assert_eq!(response.status(), reqwest::StatusCode::OK, "GET /v1/head");
        response.json().await.expect("head JSON")
    }

    /// A `POST /v1/events` request with `body` as `application/json`, ready to send.
    pub fn post_json_request(&self, body: &serde_json::Value) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .post(self.at("/v1/events"))
            .json(body)
    }

    /// `POST /v1/events` with `body` as `application/json`; the raw answer.
    pub async fn post_json(&self, body: &serde_json::Value) -> reqwest::Response {
        self.post_json_request(body)
            .send()
            .await
            .expect("POST /v1/events")
    }

    /// `POST /v1/events` that must succeed; its acks in input order.
    pub async fn publish(&self, body: &serde_json::Value) -> Vec<lockstep_proto::wire::PublishAck> {
        let response = self.post_json(body).await;
        let status = response.status();
        let text = response.text().await.expect("publish answer");
        assert_eq!(status, reqwest::StatusCode::OK, "publish refused: {text}");
        let answer: lockstep_proto::wire::PublishResponse =
            serde_json::from_str(&text).expect("publish answer JSON");
        answer.events
    }

    /// `GET /v1/events` with `query`; the status and the body as text.
    pub async fn get_events_text(&self, query: &[(&str, &str)]) -> (reqwest::StatusCode, String) {
        let response = reqwest::Client::new()
            .get(self.at("/v1/events"))
            .query(query)
            .send()
            .await
            .expect("GET /v1/events");
        let status = response.status();
        (status, response.text().await.expect("read answer"))
    }

    /// `GET /v1/events` with `query`; the status and the body as JSON.
    pub async fn get_events(
        &self,
        query: &[(&str, &str)],
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let (status, text) = self.get_events_text(query).await;
        (
            status,
            serde_json::from_str(&text).expect("read answer JSON"),
        )
    }

    /// `GET /v1/events` with `query` that must succeed; the page decoded.
    pub async fn read(&self, query: &[(&str, &str)]) -> lockstep_proto::wire::ReadResponse {
        let (status, text) = self.get_events_text(query).await;
        assert_eq!(status, reqwest::StatusCode::OK, "read refused: {text}");
        // Straight from the text: JSON data must keep the exact bytes that were hashed.
        serde_json::from_str(&text).expect("read answer shape")
    }

    /// Every event of the log, read page by page with `limit` events per page.
    pub async fn read_all(&self, limit: usize) -> Vec<lockstep_proto::wire::Event> {
        let mut events = Vec::new();
        let mut after = 0u64;
        loop {
            let page = self
                .read(&[("after", &after.to_string()), ("limit", &limit.to_string())])
                .await;
            assert!(page.events.len() <= limit, "page over its limit");
            if page.events.is_empty() {
                assert_eq!(page.next_after, page.head, "empty page before the head");
                return events;
            }
            after = page.next_after;
            events.extend(page.events);
        }
    }
}

/// Splits an error answer into its status and JSON error body, failing if the body is not
/// `{"error": {"code", "message", ...}}`.
pub async fn error_of(
    response: reqwest::Response,
) -> (reqwest::StatusCode, lockstep_proto::wire::ErrorDetail) {
    let status = response.status();
    let text = response.text().await.expect("error answer");
    let body: lockstep_proto::wire::ErrorBody = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer {status} is not a JSON error body ({e}): {text}"));
    assert!(
        !body.error.message.is_empty(),
        "error without a message: {text}"
    );
    (status, body.error)
}

/// Checks that `events` are the gapless log from position 1 and that their hash chain verifies
/// from the genesis hash; returns the last hash.
pub fn verify_chain(events: &[lockstep_proto::wire::Event]) -> lockstep_proto::ChainHash {
    let mut hash = lockstep_proto::GENESIS_HASH;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.position, i as u64 + 1, "gap or reorder in the log");
        hash = event
            .verify(&hash)
            .unwrap_or_else(|e| panic!("chain broken at {}: {e}", event.position));
    }
    hash
}

/// Sends `request`, checks its status and error code, and that the log did not change.
pub async fn refused(
    broker: &TestBroker,
    what: &str,
    request: reqwest::RequestBuilder,
    status: reqwest::StatusCode,
    code: &str,
) -> lockstep_proto::wire::ErrorDetail {
    let head = broker.head().await;
    let (got_status, error) = error_of(request.send().await.expect("send")).await;
    assert_eq!(
        (got_status, error.code.as_str()),
        (status, code),
        "{what}: {}",
        error.message
    );
    assert_eq!(broker.head().await, head, "{what}: the log changed");
    error
}

impl TestBroker {
    /// Starts a broker with default settings on an existing data directory, listening on `addr`
    /// (e.g. the address of a stopped broker, so clients keep their URL). Retries the bind for a
    /// few seconds while the old socket is released.
    pub async fn start_on(dir: TempDir, addr: std::net::SocketAddr) -> Self {
        let broker = Broker::open(quiet(Config::with_data_dir(dir.path()))).expect("open broker");
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(Instant::now() < deadline, "binding {addr} again: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        Self::serve(dir, broker, listener)
    }
}
