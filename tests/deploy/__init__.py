"""Deployment checks (`make deploy-check`): images, compose, chart, alerts, dashboard, units."""
