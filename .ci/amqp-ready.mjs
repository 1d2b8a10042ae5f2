// Waits until RabbitMQ completes an AMQP handshake: its port opens while the broker is still booting, and a
// connection made then can hang until the client's timeout. Usage: node .ci/amqp-ready.mjs [seconds]
import { connect } from 'amqplib';

const url = process.env.RABBITMQ_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
const deadline = Date.now() + Number(process.argv[2] ?? 90) * 1000;
let attempts = 0;
for (;;) {
  attempts++;
  try {
    const connection = await connect(url, { timeout: 5000 });
    const channel = await connection.createChannel();
    await channel.close();
    await connection.close();
    if (attempts > 1) console.log(`RabbitMQ accepted an AMQP connection after ${attempts} attempts`);
    process.exit(0);
  } catch (error) {
    if (Date.now() > deadline) {
      console.error(`RabbitMQ did not accept an AMQP connection in ${attempts} attempts: ${error.message}`);
      process.exit(1);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
