//! Several coordinators on one grid: forwarding, hand-over, takeover.
