module.exports.handle = async (event, context) => {
  if (event.method === "GET") {
    return { message: "Send me JSON with POST", path: event.path };
  }
  let payload;
  try {
    payload = event.json();
  } catch (err) {
    return { status: 400, body: { error: "The body must be JSON." } };
  }
  const items = payload.items || [];
  const total = items.reduce((sum, item) => sum + (item.price || 0) * (item.quantity || 1), 0);
  context.logger.info(`priced ${items.length} items`);
  return { items: items.length, total: Math.round(total * 100) / 100, invocation: context.invocationId };
};
