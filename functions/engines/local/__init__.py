"""The embedded engine: functions run as sandboxed processes on this machine."""
