//! The agent's HTTP/JSON API (axum): reads answer from the watcher's state; attach and detach
//! run the same core as the CLI (same host lock, same errors), off the async runtime. Every
//! error is JSON: `{"error":{"code":"in_use","exit_code":5,"message":"…"}}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::agent::metrics;
use crate::agent::state::Snapshot;
use crate::agent::watch::{Msg, Shared};
use crate::alloc::lease::LeaseStore;
use crate::alloc::lock::{HostLock, LockError};
use crate::alloc::plan::{owner_holdings, AttachRequest, DetachRequest};
use crate::assign::{self, AssignOptions, AssignReport};
use crate::config::GpupassConfig;
use crate::hook::cli::error_chain;
use crate::host::discover::discover;
use crate::host::sysfs::Sysfs;
use crate::libvirt::deadline::Deadline;
use crate::libvirt::virt::VirtHypervisor;
use crate::libvirt::Impact;
use crate::limits;
use crate::model::{PciAddress, PciId};
use crate::refit;
use crate::report::{gpu_report, GpuReport, LibvirtReport, ListReport};
use crate::usage::unix_now;
use crate::usage::{parse_since, summarize, Ledger, LedgerRead, UsageReport};
use crate::xml::compose::HostdevTemplate;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
pub struct Api {
    /// The watcher's state.
    pub shared: Shared,
    /// To the watcher.
    pub tx: Sender<Msg>,
    /// libvirt URI.
    pub uri: String,
    /// Host root.
    pub host_root: PathBuf,
    /// Run dir (host lock, leases).
    pub run_dir: PathBuf,
    /// The usage ledger.
    pub ledger: Ledger,
    /// The health file (quarantined GPUs).
    pub health: crate::health::store::HealthStore,
    /// Config.
    pub config: GpupassConfig,
    /// Hostdev template.
    pub template: HostdevTemplate,
    /// How long an attach/detach waits for the host lock.
    pub lock_timeout: Duration,
    /// May move host drivers (host root is `/`).
    pub manage_drivers: bool,
    /// Decisions by (action, code), for metrics.
    pub decisions: Mutex<BTreeMap<(String, String), u64>>,
    /// Time a client gets to send a request body ([`read_body_within`]).
    pub body_timeout: Duration,
}

impl Api {
    fn snapshot(&self) -> Arc<Snapshot> {
        crate::agent::watch::current(&self.shared)
    }

    fn count(&self, action: &str, code: &str) {
        let mut d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        *d.entry((action.to_owned(), code.to_owned())).or_default() += 1;
    }
}

/// A JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    exit_code: u8,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    exit_code: u8,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                exit_code: self.exit_code,
                message: &self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    /// From a documented exit code (the CLI's table) and a message.
    pub fn from_exit(exit_code: u8, message: String) -> Self {
        let (status, code) = match exit_code {
            2 => (StatusCode::BAD_REQUEST, "bad_request"),
            3 => (StatusCode::NOT_FOUND, "unknown_gpu"),
            4 => (StatusCode::NOT_FOUND, "unknown_domain"),
            5 => (StatusCode::CONFLICT, "in_use"),
            6 => (StatusCode::CONFLICT, "no_free_gpu"),
            7 => (StatusCode::CONFLICT, "not_passable"),
            8 => (StatusCode::SERVICE_UNAVAILABLE, "libvirt_unreachable"),
            9 => (StatusCode::UNPROCESSABLE_ENTITY, "libvirt_refused"),
            10 => (StatusCode::INTERNAL_SERVER_ERROR, "not_applied"),
            11 => (StatusCode::INTERNAL_SERVER_ERROR, "rollback_incomplete"),
            12 => (StatusCode::SERVICE_UNAVAILABLE, "lock_timeout"),
            15 => (StatusCode::FORBIDDEN, "limit_exceeded"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self {
            status,
            code,
            exit_code,
            message,
        }
    }

    fn bad(message: String) -> Self {
        Self::from_exit(2, message)
    }

    fn with(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            exit_code: 1,
            message,
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::with(
            status,
            "body_too_large",
            format!("request body is larger than {MAX_BODY} bytes"),
        );
    }
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return ApiError::with(
            status,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json".into(),
        );
    }
    ApiError::bad(format!("bad JSON body: {}", r.body_text()))
}

/// The router; `auth`: the bearer token the TCP listener requires (`None` on the unix socket).
pub fn router(api: Arc<Api>, auth: Option<Arc<String>>) -> Router {
    let r = Router::new()
        .route("/v1/gpus", get(gpus))
        .route("/v1/gpus/{address}", get(gpu))
        .route("/v1/domains", get(domains))
        .route("/v1/domains/{name}/attach", post(attach))
        .route("/v1/domains/{name}/detach", post(detach))
        .route("/v1/usage", get(usage))
        .route("/v1/limits", get(limits_route))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            read_body_within,
        ))
        .with_state(api);
    match auth {
        None => r,
        Some(token) => r.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let token = Arc::clone(&token);
                async move {
                    if bearer_ok(req.headers(), &token) {
                        next.run(req).await
                    } else {
                        ApiError::with(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            "missing or wrong bearer token".into(),
                        )
                        .into_response()
                    }
                }
            },
        )),
    }
}

/// Reads the whole request body (at most [`MAX_BODY`] bytes) within the body timeout before
/// the handler runs: a client that trickles its body gets 408 and its connection closes,
/// instead of holding a task and a socket for as long as it likes. Inside the token check on
/// TCP, so only an authorized client's body is ever read.
async fn read_body_within(
    State(api): State<Arc<Api>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(api.body_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(parts, bytes.into()))
                .await
        }
        Ok(Err(e)) => {
            let too_large =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::with(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body is larger than {MAX_BODY} bytes"),
                )
                .into_response()
            } else {
                ApiError::bad(format!("failed to read the request body: {e}")).into_response()
            }
        }
        Err(_) => {
            let mut r = ApiError::with(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    api.body_timeout.as_millis()
                ),
            )
            .into_response();
            // The rest of the body is never read: the connection cannot carry another request.
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

/// Constant-time comparison of the `Authorization: Bearer` token.
fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0 && !b.is_empty()
}

async fn not_found() -> ApiError {
    ApiError::with(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (see GET /v1/health, /v1/gpus, /v1/domains, /v1/usage, /v1/limits, /metrics)".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::with(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint".into(),
    )
}

fn libvirt_report(s: &Snapshot, uri: &str) -> LibvirtReport {
    LibvirtReport {
        uri: uri.to_owned(),
        connected: s.connected,
        error: s.last_error.clone(),
        stale_since: s.stale_since,
    }
}

/// `GET /v1/gpus`: the same document as `gpupass list --json`.
pub fn list_report(s: &Snapshot, uri: &str) -> ListReport {
    // Never reconciled: who uses each GPU is unknown, as in `list` without libvirt.
    let holdings = s.reconciled_at.map(|_| s.holdings());
    ListReport::new(&s.inventory, holdings.as_ref(), libvirt_report(s, uri))
}

async fn gpus(State(api): State<Arc<Api>>) -> Json<ListReport> {
    Json(list_report(&api.snapshot(), &api.uri))
}

async fn gpu(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<GpuReport>, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    let addr: PciAddress = raw.parse().map_err(|e| ApiError::bad(format!("{e}")))?;
    let s = api.snapshot();
    let g = s.inventory.gpu(addr).ok_or_else(|| {
        ApiError::from_exit(
            3,
            format!("{addr} is not a GPU of this host (GET /v1/gpus lists them)"),
        )
    })?;
    let holdings = s.reconciled_at.map(|_| s.holdings());
    Ok(Json(gpu_report(&s.inventory, g, holdings.as_ref())))
}

/// One domain in `GET /v1/domains`.
#[derive(Debug, Serialize)]
pub struct DomainReport {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Option<String>,
    /// `running` or `shut off`.
    pub state: &'static str,
    /// Persistent.
    pub persistent: bool,
    /// Owner.
    pub owner: Option<String>,
    /// The host's GPUs the domain references (live or config).
    pub gpus: Vec<PciAddress>,
    /// PCI hostdev sources of the running definition.
    pub live: Vec<PciAddress>,
    /// PCI hostdev sources of the persistent definition.
    pub config: Vec<PciAddress>,
}

#[derive(Serialize)]
struct DomainsReport {
    domains: Vec<DomainReport>,
    libvirt: LibvirtReport,
}

async fn domains(State(api): State<Arc<Api>>) -> Json<DomainsReport> {
    let s = api.snapshot();
    let domains = s
        .domains
        .values()
        .map(|d| {
            let mut gpus: Vec<PciAddress> = d
                .live
                .iter()
                .chain(&d.config)
                .filter_map(|f| s.inventory.gpu(*f).map(|g| g.address))
                .collect();
            gpus.sort();
            gpus.dedup();
            DomainReport {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                state: if d.active { "running" } else { "shut off" },
                persistent: d.persistent,
                owner: d.owner.clone(),
                gpus,
                live: d.live.clone(),
                config: d.config.clone(),
            }
        })
        .collect();
    Json(DomainsReport {
        domains,
        libvirt: libvirt_report(&s, &api.uri),
    })
}

/// `POST …/attach` body: the CLI's flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachBody {
    /// `--gpu` (any function address names its GPU).
    #[serde(default)]
    pub gpus: Vec<String>,
    /// `--count`.
    pub count: Option<u32>,
    /// `--model VVVV:DDDD` (with count).
    pub model: Option<String>,
    /// `--live`.
    #[serde(default)]
    pub live: bool,
    /// `--config`.
    #[serde(default)]
    pub config: bool,
    /// `--no-fit`: leave the persistent definition as it is (the guest fit is on by default).
    #[serde(default)]
    pub no_fit: bool,
    /// `--force`: hot-plug even GPUs whose BARs the running domain's window cannot hold.
    #[serde(default)]
    pub force: bool,
    /// `--vgpu PROFILE`: fractions instead of whole GPUs; `vf` = SR-IOV virtual functions
    /// (`gpus` then names VFs, `count` counts them; 1 when neither is given).
    pub vgpu: Option<String>,
}

/// `POST …/detach` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachBody {
    /// `--gpu`.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// `--all`.
    #[serde(default)]
    pub all: bool,
    /// `--live`.
    #[serde(default)]
    pub live: bool,
    /// `--config`.
    #[serde(default)]
    pub config: bool,
    /// `--timeout` for a live detach, seconds (default 30).
    pub timeout_seconds: Option<u64>,
    /// `--vgpu vf`: detach SR-IOV virtual functions (`gpus` names VFs, `all` takes every VF).
    pub vgpu: Option<String>,
}

/// The profiles `vgpu` takes: `vf` (SR-IOV virtual functions), as `gpupass attach --vgpu`.
/// `Ok(true)` for a VF request, `Ok(false)` when `vgpu` is absent.
fn vf_profile(vgpu: Option<&str>) -> Result<bool, ApiError> {
    match vgpu {
        None => Ok(false),
        Some("vf") => Ok(true),
        Some(p) => Err(ApiError::bad(format!(
            "vgpu {p:?}: give \"vf\" (SR-IOV virtual functions), the one profile gpupass gives so far"
        ))),
    }
}

fn addresses(raw: &[String]) -> Result<Vec<PciAddress>, ApiError> {
    raw.iter()
        .map(|s| s.parse().map_err(|e| ApiError::bad(format!("gpus: {e}"))))
        .collect()
}

/// Validates an attach body (pure).
pub fn attach_request(b: &AttachBody) -> Result<AttachRequest, ApiError> {
    let vf = vf_profile(b.vgpu.as_deref())?;
    match (b.gpus.is_empty(), b.count) {
        (false, Some(_)) => Err(ApiError::bad("give \"gpus\" or \"count\", not both".into())),
        (true, None) if !vf => Err(ApiError::bad(
            "give \"gpus\": [\"DDDD:BB:SS.F\", …] or \"count\": N".into(),
        )),
        (gpus_empty, None) => {
            if b.model.is_some() {
                return Err(ApiError::bad("\"model\" goes with \"count\"".into()));
            }
            if !vf {
                return Ok(AttachRequest::Gpus(addresses(&b.gpus)?));
            }
            // `--vgpu vf` alone: one VF, as the CLI.
            if gpus_empty {
                return Ok(AttachRequest::VfCount {
                    count: 1,
                    model: None,
                });
            }
            Ok(AttachRequest::Vfs(addresses(&b.gpus)?))
        }
        (true, Some(n)) => {
            if !(1..=256).contains(&n) {
                return Err(ApiError::bad(format!("count {n}: give 1 to 256")));
            }
            let model = b
                .model
                .as_deref()
                .map(|m| {
                    m.parse::<PciId>()
                        .map_err(|e| ApiError::bad(format!("model: {e}")))
                })
                .transpose()?;
            let count = n as usize;
            Ok(if vf {
                AttachRequest::VfCount { count, model }
            } else {
                AttachRequest::Count { count, model }
            })
        }
    }
}

/// Validates a detach body (pure).
pub fn detach_request(b: &DetachBody) -> Result<DetachRequest, ApiError> {
    let vf = vf_profile(b.vgpu.as_deref())?;
    match (b.gpus.is_empty(), b.all) {
        (false, true) => Err(ApiError::bad("give \"gpus\" or \"all\", not both".into())),
        (true, false) => Err(ApiError::bad(
            "give \"gpus\": [\"DDDD:BB:SS.F\", …] or \"all\": true".into(),
        )),
        (true, true) if vf => Ok(DetachRequest::AllVfs),
        (true, true) => Ok(DetachRequest::All),
        (false, false) if vf => Ok(DetachRequest::Vfs(addresses(&b.gpus)?)),
        (false, false) => Ok(DetachRequest::Gpus(addresses(&b.gpus)?)),
    }
}

/// `timeout_seconds` of a detach: 1 to 3600 (as `gpupass detach --timeout`), default 30.
pub fn detach_timeout(b: &DetachBody) -> Result<Duration, ApiError> {
    match b.timeout_seconds {
        None => Ok(Duration::from_secs(30)),
        Some(s @ 1..=3600) => Ok(Duration::from_secs(s)),
        Some(s) => Err(ApiError::bad(format!(
            "timeout_seconds: give 1 to 3600, not {s}"
        ))),
    }
}

fn impact(live: bool, config: bool) -> Option<Impact> {
    (live || config).then_some(Impact { live, config })
}

/// How an attach fits the domain (`no_fit`, `force` of the body).
#[derive(Clone, Copy)]
struct FitFlags {
    fit: bool,
    force: bool,
}

enum Change {
    Attach(AttachRequest, FitFlags),
    Detach(DetachRequest, Duration),
}

/// How long an API attach or detach may take under the host lock (plus a live detach's own
/// timeout), as the CLI's default `--libvirt-timeout`.
const AGENT_LIBVIRT_TIMEOUT: Duration = Duration::from_secs(60);

fn run_change(
    api: &Api,
    name: &str,
    change: &Change,
    imp: Option<Impact>,
) -> Result<AssignReport, ApiError> {
    let mut inv = discover(&Sysfs::new(&api.host_root)).map_err(|e| {
        ApiError::from_exit(
            1,
            format!("reading host root {}: {e}", api.host_root.display()),
        )
    })?;
    inv.quarantine = api
        .health
        .read()
        .map_err(|e| ApiError::from_exit(e.exit_code(), e.to_string()))?
        .quarantined;
    let hv = VirtHypervisor::open(&api.uri)
        .map_err(|e| ApiError::from_exit(e.exit_code(), e.to_string()))?;
    let lock = HostLock::acquire(&api.run_dir, api.lock_timeout).map_err(|e| {
        let code = if matches!(e, LockError::Timeout { .. }) {
            12
        } else {
            1
        };
        ApiError::from_exit(code, e.to_string())
    })?;
    let detach_timeout = match change {
        Change::Detach(_, t) => *t,
        Change::Attach(..) => Duration::from_secs(30),
    };
    // A daemon that still answers keepalive but never finishes the call would keep the host
    // lock for good: past the deadline the agent exits 8 (its service manager restarts it).
    let _deadline = Deadline::arm(
        AGENT_LIBVIRT_TIMEOUT.saturating_add(detach_timeout),
        format!("agent: change to '{name}'"),
    );
    let opts = AssignOptions {
        template: api.template.clone(),
        impact: imp,
        detach_timeout,
        leases: Some(LeaseStore::new(&api.run_dir)),
        manage_drivers: api.manage_drivers,
        config: api.config.clone(),
        ledger: Some(api.ledger.clone()),
    };
    let result = match change {
        Change::Attach(r, f) => attach_and_fit(api, &hv, &inv, &lock, name, r, &opts, *f),
        Change::Detach(r, _) => assign::detach(&hv, &inv, &lock, name, r, &opts)
            .map_err(|e| ApiError::from_exit(e.exit_code(), format!("detach from '{name}': {e}"))),
    };
    drop(lock);
    // Whatever happened, re-read the domain now rather than at the next event.
    let _ = api.tx.send(Msg::Refresh(name.to_owned()));
    result
}

/// An attach as the CLI does it: a live attach the running domain's window cannot hold is
/// refused (unless `force`), and the persistent definition is fitted to its GPUs (unless
/// `no_fit`); a fit that fails after the GPUs went in is a warning in the report.
#[allow(clippy::too_many_arguments)]
fn attach_and_fit(
    api: &Api,
    hv: &VirtHypervisor,
    inv: &crate::host::discover::Inventory,
    lock: &HostLock,
    name: &str,
    r: &AttachRequest,
    opts: &AssignOptions,
    f: FitFlags,
) -> Result<AssignReport, ApiError> {
    if !f.force {
        let live = opts.impact.map(|i| i.live);
        match refit::live_misfit(hv, &api.host_root, &api.config, inv, name, r, live) {
            Ok(Some(why)) => {
                return Err(ApiError::from_exit(2, format!("attach to '{name}': {why}")));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(ApiError::from_exit(
                    e.exit_code(),
                    format!("attach to '{name}': {e}"),
                ))
            }
        }
    }
    let mut report = assign::attach(hv, inv, lock, name, r, opts)
        .map_err(|e| ApiError::from_exit(e.exit_code(), format!("attach to '{name}': {e}")))?;
    // A VF needs no 64-bit window or slot layout of the kind a whole GPU does: not fitted (as
    // the CLI).
    if report.config && !r.is_vf() {
        if !f.fit {
            report.warnings.push(format!(
                "domain '{name}' left as it is (no_fit): `gpupass fit {name}` shows what its GPUs need"
            ));
        } else {
            match refit::apply_config(hv, &api.host_root, &api.config, inv, name, &[]) {
                Ok(o) => report.fitted = o.applied,
                Err(e) => report.warnings.push(format!(
                    "GPUs attached to '{name}', but its definition was not fitted to them: {e}; `gpupass fit {name}` shows what is missing"
                )),
            }
        }
    }
    Ok(report)
}

async fn change(
    api: Arc<Api>,
    action: &'static str,
    name: String,
    change: Change,
    imp: Option<Impact>,
) -> Result<Json<AssignReport>, ApiError> {
    let api2 = Arc::clone(&api);
    let result = tokio::task::spawn_blocking(move || run_change(&api2, &name, &change, imp))
        .await
        .map_err(|e| ApiError::from_exit(1, format!("{action} task failed: {e}")))
        .and_then(|r| r);
    api.count(action, result.as_ref().map_or_else(|e| e.code, |_| "ok"));
    result.map(Json)
}

fn domain_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    if name.is_empty() || name.len() > 1024 || name.chars().any(char::is_control) {
        return Err(ApiError::bad("bad domain name".into()));
    }
    Ok(name)
}

async fn attach(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<AttachBody>, JsonRejection>,
) -> Result<Json<AssignReport>, ApiError> {
    let checked = domain_name(path).and_then(|name| {
        let Json(b) = body.map_err(json_rejection)?;
        let flags = FitFlags {
            fit: !b.no_fit,
            force: b.force,
        };
        Ok((name, attach_request(&b)?, impact(b.live, b.config), flags))
    });
    let (name, req, imp, flags) = match checked {
        Ok(c) => c,
        Err(e) => {
            api.count("attach", e.code);
            return Err(e);
        }
    };
    change(api, "attach", name, Change::Attach(req, flags), imp).await
}

async fn detach(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<DetachBody>, JsonRejection>,
) -> Result<Json<AssignReport>, ApiError> {
    let checked = domain_name(path).and_then(|name| {
        let Json(b) = body.map_err(json_rejection)?;
        Ok((
            name,
            detach_request(&b)?,
            detach_timeout(&b)?,
            impact(b.live, b.config),
        ))
    });
    let (name, req, timeout, imp) = match checked {
        Ok(c) => c,
        Err(e) => {
            api.count("detach", e.code);
            return Err(e);
        }
    };
    change(api, "detach", name, Change::Detach(req, timeout), imp).await
}

/// The usage ledger, read off the async runtime.
async fn read_ledger(api: &Api) -> Result<LedgerRead, ApiError> {
    let ledger = api.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.read())
        .await
        .map_err(|e| ApiError::from_exit(1, format!("reading the usage ledger: {e}")))?
        .map_err(|e| ApiError::from_exit(1, error_chain(&e)))
}

/// `?since=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Unix seconds or an age (`24h`).
    pub since: Option<String>,
}

async fn usage(
    State(api): State<Arc<Api>>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let now = unix_now();
    let since = match q.since.as_deref() {
        None => 0,
        Some(s) => parse_since(s, now).ok_or_else(|| {
            ApiError::bad(format!(
                "since '{s}': give unix seconds or an age like 90m, 24h, 7d"
            ))
        })?,
    };
    let read = read_ledger(&api).await?;
    Ok(Json(summarize(&read, since, now)).into_response())
}

/// One owner in `GET /v1/limits`.
#[derive(Debug, Serialize)]
pub struct LimitReport {
    /// The owner.
    pub owner: String,
    /// `max_gpus`, when set.
    pub max_gpus: Option<u32>,
    /// GPUs the owner's domains hold now (running or defined).
    pub held_gpus: usize,
    /// The domains holding them.
    pub domains: Vec<String>,
    /// `max_gpu_hours`, when set.
    pub max_gpu_hours: Option<f64>,
    /// `day`, `week` or `month`.
    pub period: &'static str,
    /// The current period's start (unix seconds).
    pub period_start: u64,
    /// GPU-hours used in the period.
    pub used_gpu_hours: f64,
}

async fn limits_route(State(api): State<Arc<Api>>) -> Result<Json<Vec<LimitReport>>, ApiError> {
    let s = api.snapshot();
    let read = read_ledger(&api).await?;
    let now = unix_now();
    let holdings = s.holdings();
    // One summary per period start, not per owner.
    let mut by_since: BTreeMap<u64, UsageReport> = BTreeMap::new();
    let mut out = Vec::new();
    for (owner, l) in &api.config.limits {
        // The snapshot's owners already include the config rules'.
        let (held, doms) = owner_holdings(&s.inventory, &holdings, owner, None, &|_| None);
        let since = limits::period_start(l.period, now);
        let used = by_since
            .entry(since)
            .or_insert_with(|| summarize(&read, since, now))
            .owners
            .get(owner)
            .copied()
            .unwrap_or(0);
        out.push(LimitReport {
            owner: owner.clone(),
            max_gpus: l.max_gpus,
            held_gpus: held.len(),
            domains: doms.into_iter().collect(),
            max_gpu_hours: l.max_gpu_hours,
            period: l.period.as_str(),
            period_start: since,
            used_gpu_hours: used as f64 / 3600.0,
        });
    }
    Ok(Json(out))
}

/// `GET /v1/health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `ok` (libvirt connected, state fresh), `stale` (libvirt away: last known state), or
    /// `starting` (not reconciled yet).
    pub status: &'static str,
    /// libvirt.
    pub libvirt: LibvirtReport,
    /// Unix seconds of the last full reconcile.
    pub reconciled_at: Option<u64>,
    /// Domains known.
    pub domains: usize,
    /// GPUs on the host.
    pub gpus: usize,
    /// gpupass's version.
    pub version: &'static str,
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    let s = api.snapshot();
    let status = match (s.fresh(), s.reconciled_at) {
        (true, _) => "ok",
        (false, Some(_)) => "stale",
        (false, None) => "starting",
    };
    let body = Health {
        status,
        libvirt: libvirt_report(&s, &api.uri),
        reconciled_at: s.reconciled_at,
        domains: s.domains.len(),
        gpus: s.inventory.gpus.len(),
        version: env!("CARGO_PKG_VERSION"),
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_route(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    let s = api.snapshot();
    let decisions = api
        .decisions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ledger = api.ledger.clone();
    let run_dir = api.run_dir.clone();
    let text = tokio::task::spawn_blocking(move || {
        let usage = ledger.read().map(|r| summarize(&r, 0, unix_now()));
        let hook = crate::hook::decisions::read(&run_dir);
        metrics::render(&s, usage.ok().as_ref(), &decisions, &hook)
    })
    .await
    .map_err(|e| ApiError::from_exit(1, e.to_string()))?
    .map_err(|e| ApiError::from_exit(1, format!("encoding metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_validated_like_the_flags() {
        let a = |j: &str| attach_request(&serde_json::from_str::<AttachBody>(j).unwrap());
        assert_eq!(
            a(r#"{"count":2,"model":"10de:2330"}"#).unwrap(),
            AttachRequest::Count {
                count: 2,
                model: Some("10de:2330".parse().unwrap())
            }
        );
        assert!(matches!(
            a(r#"{"gpus":["0000:18:00.0"]}"#).unwrap(),
            AttachRequest::Gpus(g) if g.len() == 1
        ));
        for (j, want) in [
            (r#"{}"#, "or \"count\": N"),
            (r#"{"gpus":["0000:18:00.0"],"count":1}"#, "not both"),
            (r#"{"count":0}"#, "give 1 to 256"),
            (r#"{"count":1,"model":"nvidia"}"#, "model:"),
            (r#"{"gpus":["18:00"]}"#, "gpus:"),
            (
                r#"{"gpus":["0000:18:00.0"],"model":"10de:2330"}"#,
                "goes with",
            ),
        ] {
            let e = a(j).unwrap_err();
            assert_eq!((e.status, e.exit_code), (StatusCode::BAD_REQUEST, 2), "{j}");
            assert!(e.message.contains(want), "{j}: {}", e.message);
        }
        assert!(serde_json::from_str::<AttachBody>(r#"{"cnt":1}"#).is_err());
        let d = |j: &str| detach_request(&serde_json::from_str::<DetachBody>(j).unwrap());
        assert_eq!(d(r#"{"all":true}"#).unwrap(), DetachRequest::All);
        let t = |j: &str| detach_timeout(&serde_json::from_str::<DetachBody>(j).unwrap());
        assert_eq!(t(r#"{"all":true}"#).unwrap(), Duration::from_secs(30));
        assert_eq!(
            t(r#"{"all":true,"timeout_seconds":3600}"#).unwrap(),
            Duration::from_secs(3600)
        );
        for bad in ["0", "3601", "18446744073709551615"] {
            let e = t(&format!(r#"{{"all":true,"timeout_seconds":{bad}}}"#)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.message.contains("give 1 to 3600"), "{}", e.message);
        }
        assert!(d(r#"{}"#).is_err());
        assert!(d(r#"{"all":true,"gpus":["0000:18:00.0"]}"#).is_err());
    }

    #[test]
    fn vgpu_vf_bodies_ask_for_virtual_functions_like_the_flags() {
        let a = |j: &str| attach_request(&serde_json::from_str::<AttachBody>(j).unwrap());
        let vf: PciAddress = "0000:4d:00.1".parse().unwrap();
        assert_eq!(
            a(r#"{"vgpu":"vf","gpus":["0000:4d:00.1"]}"#).unwrap(),
            AttachRequest::Vfs(vec![vf])
        );
        assert_eq!(
            a(r#"{"vgpu":"vf","count":2,"model":"8086:56c0"}"#).unwrap(),
            AttachRequest::VfCount {
                count: 2,
                model: Some("8086:56c0".parse().unwrap())
            }
        );
        // `--vgpu vf` alone: one VF.
        assert_eq!(
            a(r#"{"vgpu":"vf"}"#).unwrap(),
            AttachRequest::VfCount {
                count: 1,
                model: None
            }
        );
        for (j, want) in [
            (r#"{"vgpu":"GRID T4-2Q","count":1}"#, "give \"vf\""),
            (
                r#"{"vgpu":"vf","gpus":["0000:4d:00.1"],"count":1}"#,
                "not both",
            ),
            (r#"{"vgpu":"vf","count":0}"#, "give 1 to 256"),
            (r#"{"vgpu":"vf","model":"8086:56c0"}"#, "goes with"),
            (r#"{"vgpu":"vf","gpus":["4d:00"]}"#, "gpus:"),
        ] {
            let e = a(j).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{j}"
            );
            assert!(e.message.contains(want), "{j}: {}", e.message);
        }
        let d = |j: &str| detach_request(&serde_json::from_str::<DetachBody>(j).unwrap());
        assert_eq!(
            d(r#"{"vgpu":"vf","all":true}"#).unwrap(),
            DetachRequest::AllVfs
        );
        assert_eq!(
            d(r#"{"vgpu":"vf","gpus":["0000:4d:00.1"]}"#).unwrap(),
            DetachRequest::Vfs(vec![vf])
        );
        assert!(d(r#"{"vgpu":"mtty-2","all":true}"#).is_err());
        assert!(d(r#"{"vgpu":"vf"}"#).is_err());
        // A shortfall of VFs is the planner's exit 6, the API's no_free_gpu (409).
        let short = crate::alloc::AllocError::NoFreeVf {
            wanted: 3,
            free: 1,
            model: String::new(),
            detail: String::new(),
        };
        let e = ApiError::from_exit(short.exit_code(), short.to_string());
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "no_free_gpu"));
    }

    #[test]
    fn exit_codes_map_to_http() {
        assert_eq!(
            ApiError::from_exit(5, String::new()).status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            ApiError::from_exit(15, String::new()).code,
            "limit_exceeded"
        );
        assert_eq!(
            ApiError::from_exit(4, String::new()).status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(ApiError::from_exit(99, String::new()).code, "internal");
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert!(bearer_ok(&h("Bearer s3cret"), "s3cret"));
        assert!(!bearer_ok(&h("Bearer s3cre"), "s3cret"));
        assert!(!bearer_ok(&h("Bearer s3cretx"), "s3cret"));
        assert!(!bearer_ok(&h("Basic s3cret"), "s3cret"));
        assert!(!bearer_ok(&HeaderMap::new(), "s3cret"));
        assert!(!bearer_ok(&h("Bearer "), ""));
    }
}
