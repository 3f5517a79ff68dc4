//! Versioned names of the bus's iceoryx2 services.
//!
//! A bus is a namespace: every service of bus `B` lives under `mdbus/B/`. The trailing version is
//! bumped whenever the wire layout of that service changes, so old and new processes never open
//! each other's services by mistake.

/// Stream id of the real-time stream (trades + K-line updates/closes + heartbeats).
pub const REALTIME_STREAM_ID: u32 = 1;

/// Stream id of the delayed snapshot stream (K-line snapshots for durable consumers).
pub const SNAPSHOT_STREAM_ID: u32 = 2;
/// Stream id of the acks stream (durable consumers → broker).
pub const ACKS_STREAM_ID: u32 = 3;

/// Name of a stream's publish-subscribe service on bus `bus`.
pub fn stream_service(bus: &str, stream: &str) -> String {
    format!("mdbus/{bus}/{stream}/v{}", crate::SCHEMA_VERSION)
}

/// Name of the event service used to wake blocked readers of a stream.
pub fn stream_wake_service(bus: &str, stream: &str) -> String {
    format!("mdbus/{bus}/{stream}/v{}/wake", crate::SCHEMA_VERSION)
}

/// The streams a broker publishes, with their ids.
pub const STREAMS: &[(&str, u32)] =
    &[("realtime", REALTIME_STREAM_ID), ("snapshot", SNAPSHOT_STREAM_ID), ("acks", ACKS_STREAM_ID)];

/// The id of a stream by name.
pub fn stream_id(name: &str) -> Option<u32> {
    STREAMS.iter().find(|(n, _)| *n == name).map(|(_, id)| *id)
}

/// Checks a bus name: 1–64 bytes of `A-Z a-z 0-9 _ -` (it becomes part of file names).
pub fn validate_bus_name(bus: &str) -> Result<(), String> {
    if bus.is_empty() || bus.len() > 64 {
        return Err(format!("bus name {bus:?} must be 1-64 characters"));
    }
    if let Some(c) = bus.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("bus name {bus:?} contains {c:?}; use letters, digits, '_' or '-'"));
    }
    Ok(())
}
