// The drivers test's workload through pgjdbc (its own protocol implementation in Java):
// batches (many Bind/Execute, one Sync), the switch from unnamed to named server-side
// statements after prepareThreshold executions, a failed statement, a rolled-back
// transaction, a large result fetched in one go.
//
// usage: java -cp postgresql.jar:. PgjdbcClient PORT APP SECRET
import java.sql.*;

public class PgjdbcClient {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?user=postgres"
            + "&ApplicationName=" + args[1] + "&prepareThreshold=5"
            + (System.getenv("AUDITOR_TEST_SSL") != null
                ? "&sslmode=" + System.getenv("AUDITOR_TEST_SSL") : "");
        String secret = args[2];
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS drv_jdbc");
                s.execute("CREATE TABLE drv_jdbc (id int PRIMARY KEY, name text, secret text)");
            }
            try (PreparedStatement p = c.prepareStatement("INSERT INTO drv_jdbc VALUES (?, ?, ?)")) {
                for (int i = 0; i < 50; i++) {
                    p.setInt(1, i);
                    p.setString(2, "name " + i);
                    p.setString(3, secret + "-" + i);
                    p.addBatch();
                }
                p.executeBatch();
            }
            System.out.println("batch");
            try (PreparedStatement p = c.prepareStatement("SELECT name FROM drv_jdbc WHERE id = ?")) {
                for (int i = 0; i < 20; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        if (!r.next() || !r.getString(1).equals("name " + i)) throw new AssertionError("row " + i);
                    }
                }
            }
            System.out.println("prepared");
            try (Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT repeat('x', 1000) FROM generate_series(1, 2000)")) {
                int n = 0;
                while (r.next()) n++;
                if (n != 2000) throw new AssertionError("rows " + n);
            }
            try (PreparedStatement p = c.prepareStatement("SELECT * FROM drv_missing_table WHERE id = ?")) {
                p.setInt(1, 1);
                p.executeQuery();
                throw new AssertionError("no error from a missing table");
            } catch (SQLException e) {
                if (!"42P01".equals(e.getSQLState())) throw e;
                System.out.println("error");
            }
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("UPDATE drv_jdbc SET name = ? WHERE id = ?")) {
                p.setString(1, "renamed");
                p.setInt(2, 1);
                p.executeUpdate();
            }
            c.rollback();
            c.setAutoCommit(true);
        }
        System.out.println("done");
    }
}
