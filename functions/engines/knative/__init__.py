"""The Knative engine: tenants as namespaces, functions as ``serving.knative.dev/v1`` Services."""
