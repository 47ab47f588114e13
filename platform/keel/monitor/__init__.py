"""Monitoring: drift of live inputs, alert rules, a Grafana dashboard, Pushgateway metrics."""
