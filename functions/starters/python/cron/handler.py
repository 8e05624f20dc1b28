import datetime


def handle(event, context):
    now = datetime.datetime.now(datetime.timezone.utc)
    context.logger.info("scheduled run at %s", now.isoformat())
    return {"ran_at": now.isoformat()}
