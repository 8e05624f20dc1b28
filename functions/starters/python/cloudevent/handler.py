def handle(event, context):
    cloudevent = event.cloudevent
    if cloudevent is None:
        return {"status": 400, "body": {"error": "Expected a CloudEvent."}}
    context.logger.info("received %s from %s", cloudevent["type"], cloudevent["source"])
    return {"received": cloudevent["id"], "type": cloudevent["type"], "data": cloudevent.get("data")}
