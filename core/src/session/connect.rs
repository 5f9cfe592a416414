//! CONNECT negotiation: what the server grants a connecting client, decided without I/O.

use crate::limits::Limits;
use crate::mqtt::{ConnAck, Connect, Properties, ProtocolVersion, ReasonCode, Will};

/// The outcome of a CONNECT the server accepts.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub client_id: String,
    /// The server made up the client id (empty id in CONNECT).
    pub assigned_client_id: bool,
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    /// Keep alive the server enforces (x1.5), in seconds; 0 = none.
    pub keep_alive_secs: u16,
    /// Sent in CONNACK when it differs from what the client asked.
    pub server_keep_alive: Option<u16>,
    /// Session expiry granted, in seconds; u32::MAX = never expires; 0 = ends with the connection.
    pub session_expiry_secs: u32,
    /// Whether the granted expiry differs from the requested one (MQTT 5 CONNACK must say so).
    pub expiry_changed: bool,
    /// The client's receive maximum: most QoS 1/2 PUBLISHes we may have unacknowledged to it.
    pub client_receive_maximum: u16,
    /// The largest packet the client accepts.
    pub client_maximum_packet_size: Option<u32>,
    pub request_problem_information: bool,
    pub will: Option<Will>,
}

/// Decide on a CONNECT. `assign_id` makes a client id for an empty one (the runtime picks one that
/// hashes to the accepting shard). An `Err` is the CONNACK refusal to send before closing.
pub fn negotiate(
    connect: &Connect,
    limits: &Limits,
    assign_id: impl FnOnce() -> String,
) -> Result<Negotiated, ReasonCode> {
    let v5 = connect.protocol.is_v5();
    let props = &connect.properties;
    if v5 && props.authentication_method.is_some() {
        // Enhanced authentication arrives with the security issue; refuse it cleanly until then.
        return Err(ReasonCode::BadAuthenticationMethod);
    }
    if connect.client_id.len() > limits.max_client_id_bytes {
        return Err(ReasonCode::ClientIdentifierNotValid);
    }
    let mut assigned = false;
    let client_id = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            // MQTT-3.1.3-8: a 3.1.1 client with an empty id must ask for a clean session.
            return Err(ReasonCode::ClientIdentifierNotValid);
        }
        assigned = true;
        assign_id()
    } else {
        connect.client_id.clone()
    };
    if let Some(will) = &connect.will {
        check_topic_limits(will.topic.as_str(), limits).map_err(|_| ReasonCode::TopicNameInvalid)?;
        if will.payload.len() > limits.max_packet_size_bytes as usize {
            return Err(ReasonCode::PacketTooLarge);
        }
    }

    let requested_expiry = if v5 {
        props.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let session_expiry_secs = requested_expiry.min(limits.max_session_expiry_secs);

    let mut keep_alive_secs = connect.keep_alive_secs;
    let mut server_keep_alive = None;
    if limits.max_keep_alive_secs > 0
        && (keep_alive_secs == 0 || keep_alive_secs > limits.max_keep_alive_secs)
    {
        keep_alive_secs = limits.max_keep_alive_secs;
        if v5 {
            server_keep_alive = Some(keep_alive_secs);
        }
    }

    Ok(Negotiated {
        client_id,
        assigned_client_id: assigned,
        protocol: connect.protocol,
        clean_start: connect.clean_start,
        keep_alive_secs,
        server_keep_alive,
        session_expiry_secs,
        expiry_changed: session_expiry_secs != requested_expiry,
        client_receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
        client_maximum_packet_size: props.maximum_packet_size,
        request_problem_information: props.request_problem_information != Some(0),
        will: connect.will.clone(),
    })
}

impl Negotiated {
    /// Whether the client asked for session expiry 0 (the granted value may be capped lower
    /// than what was asked, never raised).
    pub fn requested_expiry_zero(&self) -> bool {
        self.session_expiry_secs == 0 && !self.expiry_changed
    }

    /// The CONNACK for an accepted connection.
    pub fn connack(&self, session_present: bool, limits: &Limits) -> ConnAck {
        let mut properties = Properties::default();
        if self.protocol.is_v5() {
            if self.expiry_changed {
                properties.session_expiry_interval = Some(self.session_expiry_secs);
            }
            properties.receive_maximum = Some(limits.max_inflight_messages.max(1));
            properties.maximum_packet_size = Some(limits.max_packet_size_bytes);
            properties.topic_alias_maximum = Some(limits.max_topic_aliases);
            if self.assigned_client_id {
                properties.assigned_client_identifier = Some(self.client_id.clone());
            }
            properties.server_keep_alive = self.server_keep_alive;
        }
        ConnAck { session_present, reason: ReasonCode::Success, properties }
    }
}

/// A refusal CONNACK (the connection closes after it).
pub fn connack_refusal(reason: ReasonCode) -> ConnAck {
    ConnAck { session_present: false, reason, properties: Properties::default() }
}

/// Topic length and depth limits shared by names and filters.
pub fn check_topic_limits(topic: &str, limits: &Limits) -> Result<(), ()> {
    if topic.len() > limits.max_topic_length_bytes
        || topic.split('/').count() > limits.max_topic_levels
    {
        return Err(());
    }
    Ok(())
}
