//! The operator's calls: rollback, pause and resume, redrive, and snapshot blobs.

use lockstep_proto::consistency::{
    PauseRequest, PauseState, RedriveRequest, RedriveResult, Rollback, RollbackList,
    RollbackRequest, RollbackTo, VerifiedSnapshot,
};
use reqwest::StatusCode;

use crate::client::{Client, ClientError, REQUEST_TIMEOUT, api_error, decode};
use crate::subscription::no_content;

/// How long a snapshot upload or download may take.
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Client {
    /// Rolls every replica back to `to` (`POST /v1/rollbacks`): appends a `lockstep.rollback`
    /// record; the events between the target and it are superseded.
    pub async fn rollback(
        &self,
        to: RollbackTo,
        reason: Option<&str>,
    ) -> Result<Rollback, ClientError> {
        let request = RollbackRequest {
            to,
            reason: reason.map(str::to_owned),
        };
        let response = self
            .http
            .post(format!("{}/v1/rollbacks", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(&request)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Every rollback and how many events they superseded (`GET /v1/rollbacks`).
    pub async fn rollbacks(&self) -> Result<RollbackList, ClientError> {
        self.get("/v1/rollbacks").await
    }

    /// Pauses publishing: publishes are answered 503 + Retry-After until [`Client::resume`].
    pub async fn pause(&self, reason: Option<&str>) -> Result<PauseState, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/pause", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(&PauseRequest {
                reason: reason.map(str::to_owned),
            })
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Resumes publishing.
    pub async fn resume(&self) -> Result<PauseState, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/resume", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Whether publishing is paused.
    pub async fn pause_state(&self) -> Result<PauseState, ClientError> {
        self.get("/v1/pause").await
    }

    /// Publishes the superseded events of `[from, to]` again as new events, except `except`.
    pub async fn redrive(
        &self,
        from: u64,
        to: u64,
        except: Vec<String>,
    ) -> Result<RedriveResult, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/redrive", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(&RedriveRequest { from, to, except })
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Removes a mark.
    pub async fn remove_mark(&self, name: &str) -> Result<(), ClientError> {
        let response = self
            .http
            .delete(format!("{}/v1/marks/{name}", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        no_content(response).await
    }

    /// Whether the broker holds the snapshot with this state hash.
    pub async fn has_snapshot(&self, state_hash: &str) -> Result<bool, ClientError> {
        let response = self
            .http
            .head(format!("{}/v1/snapshots/{state_hash}", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(api_error(status, b"")),
        }
    }

    /// Uploads a snapshot; the broker stores it under its blake3 hash after checking it.
    pub async fn upload_snapshot(&self, bytes: Vec<u8>) -> Result<String, ClientError> {
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let response = self
            .http
            .put(format!("{}/v1/snapshots/{hash}", self.url()))
            .timeout(SNAPSHOT_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let status = response.status();
        if status.is_success() {
            Ok(hash)
        } else {
            let body = response.bytes().await.map_err(ClientError::Unreachable)?;
            Err(api_error(status, &body))
        }
    }

    /// Downloads the snapshot with this state hash and checks that its bytes hash to it: a
    /// damaged or substituted blob is refused.
    pub async fn download_snapshot(&self, state_hash: &str) -> Result<Vec<u8>, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/snapshots/{state_hash}", self.url()))
            .timeout(SNAPSHOT_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(ClientError::Unreachable)?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        let actual = blake3::hash(&body).to_hex();
        if actual.as_str() != state_hash {
            return Err(ClientError::Protocol(format!(
                "snapshot {state_hash} refused: its bytes hash to {actual}"
            )));
        }
        Ok(body.to_vec())
    }

    /// The newest verified snapshot of `service` at or before a position, if the broker has
    /// one (`GET /v1/snapshots/verified`).
    pub async fn verified_snapshot(
        &self,
        service: &str,
        at_or_before: Option<u64>,
    ) -> Result<Option<VerifiedSnapshot>, ClientError> {
        let mut query = vec![("service", service.to_owned())];
        if let Some(p) = at_or_before {
            query.push(("at_or_before", p.to_string()));
        }
        let response = self
            .http
            .get(format!("{}/v1/snapshots/verified", self.url()))
            .query(&query)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode(response).await.map(Some)
    }
}
