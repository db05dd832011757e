"""kafka-sidecar: consume Kafka (above all AWS MSK with IAM auth) for an app over gRPC."""

__version__ = "0.1.0"
