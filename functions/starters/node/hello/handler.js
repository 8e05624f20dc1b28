module.exports.handle = async (event, context) => {
  const name = event.query.name || "world";
  context.logger.info(`saying hello to ${name}`);
  return `Hello, ${name}!\n`;
};
