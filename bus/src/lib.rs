//! iceoryx2 plumbing shared by both sides of the bus.
//!
//! Upstream: `mdbus-schema` (service names, frame alignment). Downstream: the broker
//! (`mdbus-publisher`) opens [`StreamPublisher`]s, readers (`mdbus-subscribers`, the benchmarks)
//! open [`StreamSubscriber`]s. Both sides build services from one [`StreamSettings`], so a
//! subscriber started first creates the very service the broker later opens.
//!
//! A stream is a pair of iceoryx2 services: publish-subscribe of `[u8]` samples (each a batch of
//! frames, 16-byte aligned) and an event service the publisher notifies after each send so that
//! readers can block instead of spinning. Files of bus `B` are prefixed `mdbus_B_` in
//! `/dev/shm` and under the iceoryx2 root, so buses never collide and leftovers are easy to find.

#![forbid(unsafe_code)]

use std::time::Duration;

use iceoryx2::config::Config;
use iceoryx2::port::listener::{Listener, ListenerWaitError};
use iceoryx2::port::notifier::Notifier;
use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;
use iceoryx2::sample::Sample;
use mdbus_schema::service::{stream_service, stream_wake_service, validate_bus_name};
use mdbus_schema::FRAME_ALIGN;

pub use iceoryx2::prelude::ipc;

/// A sample as received: the payload bytes live in shared memory until it is dropped.
pub type StreamSample = Sample<ipc::Service, [u8], ()>;

type PubSubFactory = iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>;
type EventFactory = iceoryx2::service::port_factory::event::PortFactory<ipc::Service>;

/// Sizing of a stream's shared memory. Identical on both sides of a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Largest sample (batch of frames) in bytes.
    pub max_sample_bytes: usize,
    /// Samples a subscriber can have queued before the oldest is overwritten.
    pub subscriber_buffer: usize,
    /// Subscriber processes allowed at once.
    pub max_subscribers: usize,
    /// Publisher ports allowed at once: 1, so a second broker on the same bus is refused
    /// (a crashed broker's port is cleaned up when the next process opens the bus).
    pub max_publishers: usize,
    /// `false` (real-time streams): a full subscriber queue loses its oldest sample and the
    /// publisher never waits. `true`: the publisher waits until every subscriber has room
    /// (for lossless consumers and benchmarks; a stalled reader stalls the publisher). Lossless
    /// only once a subscriber has opened its side of the connection, at its first `receive` or
    /// `has_samples` after the publisher's port exists: a sample that finds a subscriber's queue
    /// full before then is dropped by iceoryx2 without a word (seqs show it).
    pub lossless: bool,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_sample_bytes: 16 * 1024,
            subscriber_buffer: 256,
            max_subscribers: 16,
            max_publishers: 1,
            lossless: false,
        }
    }
}

impl StreamSettings {
    /// The delayed snapshot stream: one broker, a few durable consumers. Lossy like the real-time
    /// stream (a stalled consumer never stalls the broker): a consumer that loses part of a
    /// snapshot sees the gap in the stream's seq, does not ack it, and gets it again merged into
    /// a later one.
    pub fn snapshot() -> StreamSettings {
        StreamSettings {
            max_sample_bytes: 64 * 1024,
            subscriber_buffer: 256,
            max_subscribers: 4,
            max_publishers: 1,
            lossless: false,
        }
    }

    /// The acks stream: durable consumers (several may publish) tell the broker what they made
    /// durable.
    pub fn acks() -> StreamSettings {
        StreamSettings {
            max_sample_bytes: 1024,
            subscriber_buffer: 64,
            max_subscribers: 2,
            max_publishers: 8,
            lossless: false,
        }
    }
}

/// A failure of the iceoryx2 layer, with the service it concerns.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus name: {0}")]
    BadBusName(String),
    #[error("creating iceoryx2 node for bus {bus}: {detail}")]
    Node { bus: String, detail: String },
    #[error("opening service {service}: {detail}")]
    Service { service: String, detail: String },
    #[error("creating {port} port on {service}: {detail}")]
    Port { service: String, port: &'static str, detail: String },
    #[error("sending on {service}: {detail}")]
    Send { service: String, detail: String },
    #[error("receiving on {service}: {detail}")]
    Receive { service: String, detail: String },
    #[error("sample of {len} bytes exceeds max_sample_bytes {max}")]
    SampleTooLarge { len: usize, max: usize },
}

/// The iceoryx2 configuration of bus `bus`: a per-bus file prefix, no config file needed.
/// Also lowers iceoryx2's own logging to warnings (override with `IOX2_LOG_LEVEL`).
pub fn iceoryx_config(bus: &str) -> Result<Config, BusError> {
    set_log_level_from_env_or(LogLevel::Warn);
    validate_bus_name(bus).map_err(BusError::BadBusName)?;
    let mut config = Config::default();
    let prefix = file_prefix(bus);
    config.global.prefix =
        FileName::new(prefix.as_bytes()).map_err(|e| BusError::BadBusName(format!("{bus}: {e:?}")))?;
    Ok(config)
}

/// The prefix of every file bus `bus` creates in `/dev/shm` and the iceoryx2 root.
pub fn file_prefix(bus: &str) -> String {
    format!("mdbus_{bus}_")
}

/// One iceoryx2 node of a process on a bus. Ports are `!Send`: create them on the thread that
/// uses them.
pub struct BusNode {
    bus: String,
    node: Node<ipc::Service>,
}

impl std::fmt::Debug for BusNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusNode").field("bus", &self.bus).finish_non_exhaustive()
    }
}

fn detail(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

impl BusNode {
    /// Opens a node named `name` on bus `bus`. Signals are left to the process (we handle
    /// SIGINT/SIGTERM ourselves so that every port is dropped and its files removed).
    pub fn open(bus: &str, name: &str) -> Result<BusNode, BusError> {
        let config = iceoryx_config(bus)?;
        let node_name = NodeName::new(name).map_err(|e| BusError::Node { bus: bus.into(), detail: detail(e) })?;
        let node = NodeBuilder::new()
            .name(&node_name)
            .config(&config)
            .signal_handling_mode(SignalHandlingMode::Disabled)
            .create::<ipc::Service>()
            .map_err(|e| BusError::Node { bus: bus.into(), detail: detail(e) })?;
        // Remove what crashed processes of this bus left behind.
        let _ = node.try_cleanup_dead_nodes();
        Ok(BusNode { bus: bus.to_owned(), node })
    }

    /// Removes the ports and files of this bus's dead processes (a `kill -9`ed subscriber), so
    /// that publishers stop counting them. Reads the bus's node list: call it from a cold thread.
    pub fn cleanup_dead_nodes(&self) {
        let _ = self.node.try_cleanup_dead_nodes();
    }

    pub fn bus(&self) -> &str {
        &self.bus
    }

    fn pubsub(&self, stream: &str, s: &StreamSettings) -> Result<(String, PubSubFactory), BusError> {
        let name = stream_service(&self.bus, stream);
        let err = |e: String| BusError::Service { service: name.clone(), detail: e };
        let sname = ServiceName::new(&name).map_err(|e| err(detail(e)))?;
        // Invariant: FRAME_ALIGN (16) is a power of two.
        let align = Alignment::new(FRAME_ALIGN).ok_or_else(|| err("bad alignment".into()))?;
        let f = self
            .node
            .service_builder(&sname)
            .publish_subscribe::<[u8]>()
            .payload_alignment(align)
            .subscriber_max_buffer_size(s.subscriber_buffer)
            .subscriber_max_borrowed_samples(4)
            .history_size(0)
            .max_subscribers(s.max_subscribers)
            .max_publishers(s.max_publishers)
            .max_nodes(s.max_subscribers + s.max_publishers + 4)
            .enable_safe_overflow(!s.lossless)
            .open_or_create()
            .map_err(|e| err(detail(e)))?;
        Ok((name, f))
    }

    fn wake(&self, stream: &str, s: &StreamSettings) -> Result<(String, EventFactory), BusError> {
        let name = stream_wake_service(&self.bus, stream);
        let err = |e: String| BusError::Service { service: name.clone(), detail: e };
        let sname = ServiceName::new(&name).map_err(|e| err(detail(e)))?;
        let f = self
            .node
            .service_builder(&sname)
            .event()
            .max_listeners(s.max_subscribers)
            .max_notifiers(s.max_publishers)
            .max_nodes(s.max_subscribers + s.max_publishers + 4)
            .open_or_create()
            .map_err(|e| err(detail(e)))?;
        Ok((name, f))
    }

    /// Opens (creating if needed) stream `stream` for publishing.
    pub fn publisher(&self, stream: &str, settings: StreamSettings) -> Result<StreamPublisher, BusError> {
        let (service, ps) = self.pubsub(stream, &settings)?;
        let (_, ev) = self.wake(stream, &settings)?;
        let port_err = |port, e: String| BusError::Port { service: service.clone(), port, detail: e };
        let publisher = ps
            .publisher_builder()
            .initial_max_slice_len(settings.max_sample_bytes)
            .allocation_strategy(AllocationStrategy::Static)
            .max_loaned_samples(2)
            .backpressure_strategy(if settings.lossless {
                BackpressureStrategy::RetryUntilDelivered
            } else {
                BackpressureStrategy::DiscardData
            })
            .create()
            .map_err(|e| port_err("publisher", detail(e)))?;
        let notifier = ev.notifier_builder().create().map_err(|e| port_err("notifier", detail(e)))?;
        Ok(StreamPublisher { service, publisher, notifier, max: settings.max_sample_bytes })
    }

    /// Opens (creating if needed) stream `stream` for reading. `buffer` samples are queued for
    /// this subscriber (at most `settings.subscriber_buffer`).
    pub fn subscriber(
        &self,
        stream: &str,
        settings: StreamSettings,
        buffer: usize,
    ) -> Result<StreamSubscriber, BusError> {
        let (service, ps) = self.pubsub(stream, &settings)?;
        let (_, ev) = self.wake(stream, &settings)?;
        let port_err = |port, e: String| BusError::Port { service: service.clone(), port, detail: e };
        let subscriber = ps
            .subscriber_builder()
            .buffer_size(buffer.clamp(1, settings.subscriber_buffer))
            .create()
            .map_err(|e| port_err("subscriber", detail(e)))?;
        let listener = ev.listener_builder().create().map_err(|e| port_err("listener", detail(e)))?;
        Ok(StreamSubscriber { service, subscriber, listener })
    }
}

/// The sending end of a stream.
pub struct StreamPublisher {
    service: String,
    publisher: Publisher<ipc::Service, [u8], ()>,
    notifier: Notifier<ipc::Service>,
    max: usize,
}

impl std::fmt::Debug for StreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPublisher").field("service", &self.service).finish_non_exhaustive()
    }
}

impl StreamPublisher {
    /// Copies `bytes` (a batch of frames) into one shared-memory sample, sends it and wakes
    /// blocked readers. Returns the number of subscribers reached.
    pub fn send(&self, bytes: &[u8]) -> Result<usize, BusError> {
        if bytes.len() > self.max {
            return Err(BusError::SampleTooLarge { len: bytes.len(), max: self.max });
        }
        let err = |e: String| BusError::Send { service: self.service.clone(), detail: e };
        let sample = self.publisher.loan_slice_uninit(bytes.len()).map_err(|e| err(detail(e)))?;
        let sample = sample.write_from_slice(bytes);
        let reached = sample.send().map_err(|e| err(detail(e)))?;
        // A failed wake-up only delays blocked readers until their timeout; the data is sent.
        let _ = self.notifier.notify();
        Ok(reached)
    }

    pub fn max_sample_bytes(&self) -> usize {
        self.max
    }

    pub fn service(&self) -> &str {
        &self.service
    }
}

/// The reading end of a stream.
pub struct StreamSubscriber {
    service: String,
    subscriber: Subscriber<ipc::Service, [u8], ()>,
    listener: Listener<ipc::Service>,
}

impl std::fmt::Debug for StreamSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSubscriber").field("service", &self.service).finish_non_exhaustive()
    }
}

impl StreamSubscriber {
    /// The next queued sample, if any. Never blocks.
    pub fn receive(&self) -> Result<Option<StreamSample>, BusError> {
        self.subscriber.receive().map_err(|e| BusError::Receive { service: self.service.clone(), detail: detail(e) })
    }

    /// Whether a sample is waiting (cheap; for busy-polling).
    pub fn has_samples(&self) -> bool {
        self.subscriber.has_samples().unwrap_or(false)
    }

    /// Blocks until the publisher signals new data or `timeout` passes. Spurious returns are
    /// possible; always follow with [`receive`](Self::receive) until it yields `None`.
    pub fn wait(&self, timeout: Duration) -> Result<(), BusError> {
        match self.listener.timed_wait(|_| {}, timeout) {
            // A signal (e.g. the Ctrl-C that stops us) interrupts the wait: not an error.
            Ok(_) | Err(ListenerWaitError::InterruptSignal) => Ok(()),
            Err(e) => Err(BusError::Receive { service: self.service.clone(), detail: detail(e) }),
        }
    }

    /// Discards pending wake-ups without blocking.
    pub fn drain_wakeups(&self) {
        let _ = self.listener.try_wait(|_| {});
    }

    pub fn service(&self) -> &str {
        &self.service
    }
}
