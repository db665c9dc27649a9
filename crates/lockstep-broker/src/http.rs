//! The HTTP API (axum). Handlers parse and validate, call the [`Broker`], and map its errors to a
//! status and a JSON body `{"error": {"code", "message"}}`. They never touch storage directly.
//!
//! Routes (all in [`router`]; each documented in `docs/http-api.md`): events and the head;
//! subscriptions and their delivery; barriers, reports, verification and explanations; marks,
//! rollbacks, pause/resume and redrive; snapshot blobs; health and metrics.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::DateTime;
use lockstep_proto::TypeFilter;
use lockstep_proto::consistency::{
    CreateMark, EntriesReport, PauseRequest, RedriveRequest, RollbackRequest, SnapshotGcRequest,
    StateReport,
};
use lockstep_proto::subscription::{Ack, ReplicaStatus, SubscriptionSpec};
use lockstep_proto::wire::{ErrorBody, ErrorDetail, write_publish_response};
use serde::Deserialize;

use crate::Broker;
use crate::cloudevents;
use crate::consistency::ReportError;
use crate::error::{AppendError, ConflictKind, PublishError, ReadError};
use crate::publish::parse_native;
use crate::read::Layout;
use crate::read::{DEFAULT_LIMIT, MAX_LIMIT, MAX_WAIT_MS, ReadQuery};
use crate::registry::RegistryError;
use crate::rollback::RollbackError;
use crate::snapshots::SnapshotError;

/// The broker's router, with its body limit.
pub fn router(broker: Broker) -> Router {
    let max_body = broker.config().max_body_bytes;
    Router::new()
        .route("/v1/events", get(read_events).post(publish))
        .route("/v1/events/{position}", get(read_event))
        .route("/v1/head", get(head))
        .route("/v1/barriers", post(barrier))
        .route("/v1/reports", post(report))
        .route("/v1/reports/entries", post(report_entries))
        .route("/v1/explain", get(explain))
        .route("/v1/verify", get(verify))
        .route("/v1/consistency", get(verify))
        .route("/v1/marks", get(list_marks).post(create_mark))
        .route("/v1/marks/{name}", get(get_mark).delete(delete_mark))
        .route("/v1/rollbacks", get(list_rollbacks).post(rollback))
        .route("/v1/pause", get(pause_state).post(pause))
        .route("/v1/resume", post(resume))
        .route("/v1/redrive", post(redrive))
        .route("/v1/snapshots/verified", get(verified_snapshot))
        .route("/v1/snapshots/gc", post(collect_snapshots))
        .route(
            "/v1/snapshots/{hash}",
            get(get_snapshot)
                .head(head_snapshot)
                .put(put_snapshot)
                .layer(DefaultBodyLimit::max(broker.config().max_snapshot_bytes)),
        )
        .route(
            "/v1/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route(
            "/v1/subscriptions/{service}/{replica}",
            get(get_subscription).delete(delete_subscription),
        )
        .route(
            "/v1/subscriptions/{service}/{replica}/events",
            get(subscription_events),
        )
        .route(
            "/v1/subscriptions/{service}/{replica}/stream",
            get(subscription_stream),
        )
        .route("/v1/subscriptions/{service}/{replica}/ack", post(ack))
        .route(
            "/v1/subscriptions/{service}/{replica}/status",
            post(report_status),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(broker)
}

/// An error answer: status plus the JSON error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                current: None,
                index: None,
            },
            retry_after: None,
        }
    }

    fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the broker could not complete the request; see its log",
        )
    }

    fn unavailable() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the broker is shutting down; retry against it once it is back",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<PublishError> for ApiError {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::Invalid {
                code,
                message,
                index,
            } => {
                let mut e = ApiError::bad_request(code, message);
                e.detail.index = index;
                e
            }
            PublishError::Append(AppendError::Conflict {
                index,
                ref kind,
                current,
                ..
            }) => {
                let code = match kind {
                    ConflictKind::Head => "head_conflict",
                    ConflictKind::Key(_) => "key_conflict",
                };
                let mut e = ApiError::new(StatusCode::CONFLICT, code, err.to_string());
                e.detail.current = Some(current);
                e.detail.index = Some(index);
                e
            }
            PublishError::Append(AppendError::Refused { index, ref message }) => {
                let mut e = ApiError::new(StatusCode::CONFLICT, "refused", message.clone());
                e.detail.index = Some(index);
                e
            }
            PublishError::Paused(_) => Self {
                retry_after: Some(crate::rollback::PAUSED_RETRY_AFTER_SECS),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "paused", err.to_string())
            },
            PublishError::Append(AppendError::Closed) => ApiError::unavailable(),
            PublishError::Append(AppendError::Storage(e)) => {
                ApiError::internal("publish failed", e)
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Invalid(message) => {
                ApiError::bad_request("invalid_subscription", message)
            }
            RegistryError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "subscription_conflict", message)
            }
            RegistryError::NotFound(..) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
            }
            RegistryError::Store(e) => ApiError::internal("registry failed", e),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Invalid { code, message } => ApiError::bad_request(code, message),
            ReadError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
            }
            ReadError::Store(e) => ApiError::internal("read failed", e),
        }
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than the broker's limit (max_body_bytes)",
        )
    } else {
        ApiError::new(rejection.status(), "bad_body", rejection.body_text())
    }
}

async fn publish(
    State(broker): State<Broker>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request("bad_header", "Content-Type is not ASCII"))
        })
        .transpose()?;
    let essence = content_type.map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    let drafts = if cloudevents::is_binary(&headers) {
        cloudevents::parse_binary(&headers, content_type, &body)
    } else {
        match essence.as_deref() {
            None | Some("application/json") => parse_native(&body),
            Some(cloudevents::STRUCTURED) => cloudevents::parse_structured(&body),
            Some(cloudevents::BATCH) => cloudevents::parse_batch(&body),
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_content_type",
                    format!(
                        "Content-Type {other:?} is not accepted: send application/json, \
                         application/cloudevents+json, application/cloudevents-batch+json, \
                         or a binary-mode CloudEvent with ce-* headers"
                    ),
                ));
            }
        }
    }?;
    let acks = broker.publish(drafts).await?;
    Ok(json_bytes(write_publish_response(&acks)))
}

/// Query parameters of `GET /v1/events`, as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    after: Option<u64>,
    limit: Option<usize>,
    types: Option<String>,
    since: Option<String>,
    until: Option<String>,
    wait_ms: Option<u64>,
    include_superseded: Option<bool>,
}

impl ReadParams {
    fn into_query(self) -> Result<ReadQuery, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_LIMIT}, not {limit}"),
            ));
        }
        let wait_ms = self.wait_ms.unwrap_or(0);
        if wait_ms > MAX_WAIT_MS {
            return Err(ApiError::bad_request(
                "invalid_wait",
                format!("wait_ms must be at most {MAX_WAIT_MS}, not {wait_ms}"),
            ));
        }
        let filter = match &self.types {
            Some(list) => TypeFilter::parse_list(list)
                .map_err(|e| ApiError::bad_request("invalid_pattern", e.to_string()))?,
            None => TypeFilter::all(),
        };
        Ok(ReadQuery {
            after: self.after.unwrap_or(0),
            limit,
            filter,
            since_ns: self
                .since
                .as_deref()
                .map(|t| time_param("since", t))
                .transpose()?,
            until_ns: self
                .until
                .as_deref()
                .map(|t| time_param("until", t))
                .transpose()?,
            wait: Duration::from_millis(wait_ms),
            include_superseded: self.include_superseded.unwrap_or(false),
            ..ReadQuery::default()
        })
    }
}

fn time_param(name: &str, text: &str) -> Result<i64, ApiError> {
    // An unencoded '+' in a query string arrives as a space; put it back.
    let text = text.trim().replace(' ', "+");
    DateTime::parse_from_rfc3339(&text)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_time",
                format!("{name}={text:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z"),
            )
        })
}

async fn read_events(
    State(broker): State<Broker>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let page = broker.read(params.into_query()?).await?;
    Ok(json_bytes(page.body))
}

async fn read_event(
    State(broker): State<Broker>,
    position: Result<Path<u64>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(position) = position.map_err(|_| {
        ApiError::bad_request("invalid_position", "a position is a whole number from 1")
    })?;
    Ok(json_bytes(broker.event(position).await?))
}

fn json_bytes(body: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn head(State(broker): State<Broker>) -> Response {
    Json(broker.head()).into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(broker): State<Broker>) -> Response {
    if *broker.inner.stopping.borrow() {
        ApiError::unavailable().into_response()
    } else {
        Json(serde_json::json!({"status": "ready", "head": broker.head().position})).into_response()
    }
}

async fn metrics(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let mut text = broker.metrics_text();
    crate::metrics::render_subscriptions(&broker.subscriptions().await?, &mut text);
    let verification = broker
        .verify(None)
        .await
        .map_err(|e| ApiError::internal("verification failed", e))?;
    crate::metrics::render_consistency(
        &verification,
        broker.pause_state().paused,
        broker.log().superseded().count(),
        &mut text,
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response())
}

/// Parses a JSON body into `T`, answering 400 with serde's words when it does not fit.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON body: {e}")))
}

/// Like [`json_body`], for routes whose body is optional: an empty one means `T::default()`.
fn optional_json_body<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json_body(Ok(body))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    #[serde(default)]
    replace: bool,
}

async fn create_subscription(
    State(broker): State<Broker>,
    params: Result<Query<CreateParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let spec: SubscriptionSpec = json_body(body)?;
    let (info, created) = broker.subscribe(spec, params.replace).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

async fn list_subscriptions(State(broker): State<Broker>) -> Result<Response, ApiError> {
    Ok(Json(broker.subscriptions().await?).into_response())
}

type SubscriptionPath = Result<Path<(String, String)>, PathRejection>;

fn names(path: SubscriptionPath) -> Result<(String, String), ApiError> {
    path.map(|Path(names)| names).map_err(|e| {
        ApiError::bad_request(
            "invalid_path",
            format!("bad subscription path: {}", e.body_text()),
        )
    })
}

async fn get_subscription(
    State(broker): State<Broker>,
    path: SubscriptionPath,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    Ok(Json(broker.subscription(&service, &replica).await?).into_response())
}

async fn delete_subscription(
    State(broker): State<Broker>,
    path: SubscriptionPath,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    broker.unsubscribe(&service, &replica).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Query parameters of a subscription's pull routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullParams {
    after: Option<u64>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

impl PullParams {
    fn check(
        params: Result<Query<PullParams>, QueryRejection>,
        head: u64,
    ) -> Result<PullParams, ApiError> {
        let Query(params) =
            params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
        if let Some(limit) = params.limit
            && !(1..=MAX_LIMIT).contains(&limit)
        {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_LIMIT}, not {limit}"),
            ));
        }
        if let Some(wait) = params.wait_ms
            && wait > MAX_WAIT_MS
        {
            return Err(ApiError::bad_request(
                "invalid_wait",
                format!("wait_ms must be at most {MAX_WAIT_MS}, not {wait}"),
            ));
        }
        if let Some(after) = params.after
            && after > head
        {
            return Err(ApiError::bad_request(
                "after_past_head",
                format!("after={after} is past the head of the log ({head})"),
            ));
        }
        Ok(params)
    }
}

async fn subscription_events(
    State(broker): State<Broker>,
    path: SubscriptionPath,
    params: Result<Query<PullParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    let sub = broker.subscription_handle(&service, &replica)?;
    let params = PullParams::check(params, broker.head().position)?;
    let page = broker
        .subscription_page(
            &sub,
            params.after,
            params.limit.unwrap_or(DEFAULT_LIMIT),
            Duration::from_millis(params.wait_ms.unwrap_or(0)),
            Layout::Page,
        )
        .await?;
    Ok(json_bytes(page.body))
}

async fn subscription_stream(
    State(broker): State<Broker>,
    path: SubscriptionPath,
    params: Result<Query<PullParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    let sub = broker.subscription_handle(&service, &replica)?;
    let params = PullParams::check(params, broker.head().position)?;
    let stream = broker.subscription_stream(sub, params.after);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn ack(
    State(broker): State<Broker>,
    path: SubscriptionPath,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    let Ack { position } = json_body(body)?;
    let position = broker.ack(&service, &replica, position)?;
    Ok(Json(serde_json::json!({ "position": position })).into_response())
}

async fn report_status(
    State(broker): State<Broker>,
    path: SubscriptionPath,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, replica) = names(path)?;
    let ReplicaStatus { stuck } = json_body(body)?;
    broker.report_status(&service, &replica, stuck)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn barrier(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let position = broker.barrier().await?;
    Ok(Json(serde_json::json!({ "position": position })).into_response())
}

async fn report(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let report: StateReport = json_body(body)?;
    Ok(Json(broker.report(report).await?).into_response())
}

async fn report_entries(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let report: EntriesReport = json_body(body)?;
    broker.report_entries(report).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainParams {
    service: String,
}

async fn explain(
    State(broker): State<Broker>,
    params: Result<Query<ExplainParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let explanation = broker
        .explain(&params.service)
        .await
        .map_err(|e| ApiError::internal("explaining failed", e))?;
    Ok(Json(explanation).into_response())
}

impl From<ReportError> for ApiError {
    fn from(err: ReportError) -> Self {
        match err {
            ReportError::Invalid(message) => ApiError::bad_request("invalid_report", message),
            ReportError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "mark_conflict", message)
            }
            ReportError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
            }
            ReportError::Store(e) => ApiError::internal("consistency store failed", e),
        }
    }
}

async fn create_mark(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CreateMark = json_body(body)?;
    Ok(Json(broker.create_mark(request).await?).into_response())
}

async fn list_marks(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let marks = broker
        .marks()
        .await
        .map_err(|e| ApiError::internal("listing marks failed", e))?;
    Ok(Json(marks).into_response())
}

async fn get_mark(
    State(broker): State<Broker>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    Ok(Json(broker.mark(&name).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    service: Option<String>,
}

async fn verify(
    State(broker): State<Broker>,
    params: Result<Query<VerifyParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let verification = broker
        .verify(params.service)
        .await
        .map_err(|e| ApiError::internal("verification failed", e))?;
    Ok(Json(verification).into_response())
}

async fn delete_mark(
    State(broker): State<Broker>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    broker.remove_mark(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

impl From<RollbackError> for ApiError {
    fn from(err: RollbackError) -> Self {
        match err {
            RollbackError::Report(e) => e.into(),
            RollbackError::Publish(e) => e.into(),
            RollbackError::Invalid(message) => ApiError::bad_request("invalid_request", message),
            RollbackError::Busy(message) => Self {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
            },
        }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(err: SnapshotError) -> Self {
        match err {
            SnapshotError::Invalid(message) => ApiError::bad_request("invalid_snapshot", message),
            SnapshotError::NotFound(message) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            SnapshotError::Damaged(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "snapshot_damaged",
                err.to_string(),
            ),
            SnapshotError::Store(e) => ApiError::internal("snapshot store failed", e),
        }
    }
}

async fn rollback(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: RollbackRequest = json_body(body)?;
    Ok(Json(broker.rollback(request).await?).into_response())
}

async fn list_rollbacks(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let list = broker
        .rollbacks()
        .await
        .map_err(|e| ApiError::internal("listing rollbacks failed", e))?;
    Ok(Json(list).into_response())
}

async fn pause_state(State(broker): State<Broker>) -> Response {
    Json(broker.pause_state()).into_response()
}

async fn pause(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: PauseRequest = optional_json_body(body)?;
    crate::rollback::check_reason(request.reason.as_deref())
        .map_err(|message| ApiError::bad_request("invalid_request", message))?;
    let state = broker
        .set_paused(Some(request.reason))
        .await
        .map_err(|e| ApiError::internal("pausing failed", e))?;
    Ok(Json(state).into_response())
}

async fn resume(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let state = broker
        .set_paused(None)
        .await
        .map_err(|e| ApiError::internal("resuming failed", e))?;
    Ok(Json(state).into_response())
}

async fn redrive(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: RedriveRequest = json_body(body)?;
    Ok(Json(broker.redrive(request).await?).into_response())
}

type HashPath = Result<Path<String>, PathRejection>;

fn hash_path(path: HashPath) -> Result<String, ApiError> {
    path.map(|Path(hash)| hash)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

async fn put_snapshot(
    State(broker): State<Broker>,
    path: HashPath,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let hash = hash_path(path)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the snapshot is larger than the broker's limit (max_snapshot_bytes)",
            )
        } else {
            body_error(rejection)
        }
    })?;
    let created = broker.put_snapshot(&hash, body.to_vec()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(serde_json::json!({ "state_hash": hash }))).into_response())
}

async fn get_snapshot(State(broker): State<Broker>, path: HashPath) -> Result<Response, ApiError> {
    let hash = hash_path(path)?;
    let bytes = broker.snapshot(&hash).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        bytes,
    )
        .into_response())
}

async fn head_snapshot(State(broker): State<Broker>, path: HashPath) -> Result<Response, ApiError> {
    let hash = hash_path(path)?;
    match broker.snapshot_size(&hash)? {
        Some(size) => Ok(([(header::CONTENT_LENGTH, HeaderValue::from(size))], ()).into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

async fn collect_snapshots(
    State(broker): State<Broker>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: SnapshotGcRequest = optional_json_body(body)?;
    let grace = request
        .grace_seconds
        .map_or(crate::snapshots::GC_GRACE, Duration::from_secs);
    Ok(Json(broker.collect_snapshots(grace).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifiedSnapshotParams {
    service: String,
    at_or_before: Option<u64>,
}

async fn verified_snapshot(
    State(broker): State<Broker>,
    params: Result<Query<VerifiedSnapshotParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let found = broker
        .verified_snapshot(&params.service, params.at_or_before)
        .await?;
    Ok(Json(found).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see docs/http-api.md",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see docs/http-api.md",
    )
}
