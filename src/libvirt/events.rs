//! libvirt's event loop and the events gpupass listens to — domain lifecycle, device added and
//! removed, connection closed — handed to a Rust closure. The `virt` crate has no safe wrapper
//! for `virConnectDomainEventRegisterAny`, so this file holds all of gpupass's `unsafe`: four
//! callbacks that copy what they need out of libvirt's pointers and return.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};

use virt::sys;

use crate::libvirt::virt::VirtHypervisor;
use crate::libvirt::LibvirtError;

/// Something libvirt told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibvirtEvent {
    /// A domain changed: started, stopped, defined, undefined, a device came or went.
    Domain {
        /// The domain's name.
        name: String,
        /// What happened.
        kind: DomainEventKind,
    },
    /// The connection closed (libvirtd went away, keepalive timed out).
    Closed {
        /// libvirt's `virConnectCloseReason`.
        reason: i32,
    },
}

/// Which event a domain sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainEventKind {
    /// `VIR_DOMAIN_EVENT_ID_LIFECYCLE` with its `virDomainEventType` (0 defined … 8 crashed).
    Lifecycle(i32),
    /// `VIR_DOMAIN_EVENT_ID_DEVICE_ADDED`.
    DeviceAdded,
    /// `VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED`.
    DeviceRemoved,
    /// `VIR_DOMAIN_EVENT_ID_METADATA_CHANGE` (an owner set with `virsh metadata`).
    MetadataChanged,
}

/// Where events go. Called on libvirt's event-loop thread: it must not block.
pub type EventSink = Arc<dyn Fn(LibvirtEvent) + Send + Sync>;

static EVENT_LOOP: OnceLock<Result<(), LibvirtError>> = OnceLock::new();

/// Registers libvirt's default event loop and runs it on its own thread, once per process (a
/// later call returns the first call's result). Must be called before the connection that will
/// carry events is opened.
pub fn start_event_loop() -> Result<(), LibvirtError> {
    EVENT_LOOP
        .get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| LibvirtError::Call {
                action: "register libvirt's event loop".into(),
                message: e.message().to_owned(),
            })?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e.message(), "libvirt event loop iteration failed");
                    }
                })
                .map(drop)
                .map_err(|e| LibvirtError::Call {
                    action: "start libvirt's event-loop thread".into(),
                    message: e.to_string(),
                })
        })
        .clone()
}

fn domain_name(dom: sys::virDomainPtr) -> Option<String> {
    if dom.is_null() {
        return None;
    }
    // SAFETY: `dom` is the live domain object libvirt passes to the callback; the returned
    // string belongs to it and stays valid for the duration of the callback, which is all we
    // use it for (it is copied into a String here).
    let p = unsafe { sys::virDomainGetName(dom) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, owned by `dom` (see above).
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn deliver(opaque: *mut c_void, event: LibvirtEvent) {
    if opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the `Box<EventSink>` leaked in `register`, freed only by
    // `free_sink`, which libvirt calls after the last callback for that registration.
    let sink = unsafe { &*(opaque as *const EventSink) };
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(event)));
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    if let Some(name) = domain_name(dom) {
        deliver(
            opaque,
            LibvirtEvent::Domain {
                name,
                kind: DomainEventKind::Lifecycle(event),
            },
        );
    }
    0
}

unsafe extern "C" fn on_device_added(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    if let Some(name) = domain_name(dom) {
        let kind = DomainEventKind::DeviceAdded;
        deliver(opaque, LibvirtEvent::Domain { name, kind });
    }
}

unsafe extern "C" fn on_device_removed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    if let Some(name) = domain_name(dom) {
        let kind = DomainEventKind::DeviceRemoved;
        deliver(opaque, LibvirtEvent::Domain { name, kind });
    }
}

unsafe extern "C" fn on_metadata(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) {
    if let Some(name) = domain_name(dom) {
        let kind = DomainEventKind::MetadataChanged;
        deliver(opaque, LibvirtEvent::Domain { name, kind });
    }
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    deliver(opaque, LibvirtEvent::Closed { reason });
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `Box::into_raw` in `leak_sink`; libvirt calls the free
        // callback exactly once, after the last event of the registration.
        drop(unsafe { Box::from_raw(opaque as *mut EventSink) });
    }
}

fn leak_sink(sink: &EventSink) -> *mut c_void {
    Box::into_raw(Box::new(Arc::clone(sink))) as *mut c_void
}

fn call_error(action: &str) -> LibvirtError {
    let e = virt::error::Error::last_error();
    LibvirtError::Call {
        action: action.to_owned(),
        message: e.message().to_owned(),
    }
}

/// The registrations of one connection; dropping it deregisters them (libvirt's callbacks hold
/// a reference on the connection, which would otherwise never close).
pub struct Subscription {
    conn: virt::connect::Connect,
    ids: Vec<c_int>,
    close: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("ids", &self.ids)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // SAFETY: `self.conn` holds its own reference, so the pointer is valid; deregistering
        // on a dead connection fails harmlessly and libvirt frees the sinks either way.
        let conn = unsafe { self.conn.as_ptr() };
        for id in self.ids.drain(..) {
            // SAFETY: `id` was returned by virConnectDomainEventRegisterAny on `conn`.
            unsafe { sys::virConnectDomainEventDeregisterAny(conn, id) };
        }
        if self.close {
            // SAFETY: `on_close` was registered on `conn`.
            unsafe { sys::virConnectUnregisterCloseCallback(conn, Some(on_close)) };
        }
    }
}

/// Sends this connection's domain events and its close to `sink`, and turns on keepalive so a
/// dead daemon is noticed within ~15 s even without traffic, until the returned subscription
/// is dropped. [`start_event_loop`] must have run before `hv` was opened.
pub fn subscribe(hv: &VirtHypervisor, sink: EventSink) -> Result<Subscription, LibvirtError> {
    let mut sub = Subscription {
        conn: hv.connection().clone(),
        ids: Vec::new(),
        close: false,
    };
    // SAFETY: the pointer is used while `sub.conn` holds a reference.
    let conn = unsafe { sub.conn.as_ptr() };
    // libvirt's C API passes every domain callback as the generic type and calls it with the
    // signature of the event ID (VIR_DOMAIN_EVENT_CALLBACK in libvirt-domain.h does the same).
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    type Lifecycle = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type Device =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
    type Metadata = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        *const c_char,
        *mut c_void,
    );
    // SAFETY: function-pointer casts between extern "C" fns; libvirt calls each with the
    // signature of its event ID, which is the signature it was defined with.
    let callbacks: [(u32, Generic); 4] = unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                std::mem::transmute::<Lifecycle, Generic>(on_lifecycle),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                std::mem::transmute::<Device, Generic>(on_device_added),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                std::mem::transmute::<Device, Generic>(on_device_removed),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                std::mem::transmute::<Metadata, Generic>(on_metadata),
            ),
        ]
    };
    for (id, cb) in callbacks {
        let opaque = leak_sink(&sink);
        // SAFETY: `conn` is open; `opaque` is a leaked Box that libvirt hands back to the
        // callbacks and finally to `free_sink`.
        let rc = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn,
                std::ptr::null_mut(),
                id as c_int,
                Some(cb),
                opaque,
                Some(free_sink),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not take the box; reclaim it.
            unsafe { free_sink(opaque) };
            return Err(call_error("register for domain events"));
        }
        sub.ids.push(rc);
    }
    let opaque = leak_sink(&sink);
    // SAFETY: as above, for the close callback.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(conn, Some(on_close), opaque, Some(free_sink))
    };
    if rc < 0 {
        // SAFETY: registration failed; libvirt did not take the box.
        unsafe { free_sink(opaque) };
        return Err(call_error("register for connection close"));
    }
    sub.close = true;
    // SAFETY: `conn` is open; keepalive needs the event loop, which runs.
    if unsafe { sys::virConnectSetKeepAlive(conn, 5, 3) } < 0 {
        tracing::debug!("libvirt keepalive not available on this connection");
    }
    Ok(sub)
}
